"""Output paths resolved as REAPI defines them: relative to the working directory, ``..``
allowed while it stays inside the input root. Tests are named after what a client sends."""

import pytest

from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.worker.output_paths import OutputKind, output_specs, resolve_output_path

WORKDIR = ("buildstream", "project", "element.bst")


@pytest.mark.parametrize(("path", "expected"), [
    ("../../../buildstream-install", ("buildstream-install",)),  # BuildStream's install root
    ("..", ("buildstream", "project")),
    ("../../..", ()),  # the input root itself
    (".", WORKDIR),
    ("", WORKDIR),
    ("./out//a", WORKDIR + ("out", "a")),
    ("out/../../sibling", ("buildstream", "project", "sibling")),
])
def test_dotdot_inside_the_input_root_is_resolved_lexically(path, expected):
    assert resolve_output_path(WORKDIR, path, "command.output_paths entry") == expected


@pytest.mark.parametrize(("path", "problem"), [
    ("../../../..", "leaves the input root"),
    ("../../../../etc/passwd", "leaves the input root"),
    ("a/../../../../../b", "leaves the input root"),
    ("/etc/passwd", "is absolute"),
    ("out/", "ends in '/'"),
    ("./", "ends in '/'"),
    ("a\0b", "NUL"),
    ("x" * 256, "longer than 255 bytes"),
    ("é" * 128, "longer than 255 bytes"),  # 256 bytes in UTF-8, 128 characters
])
def test_escaping_absolute_trailing_slash_and_overlong_paths_are_refused_naming_them(path, problem):
    with pytest.raises(InvalidArgument) as raised:
        resolve_output_path(WORKDIR, path, "command.output_paths entry")
    assert problem in str(raised.value)
    assert repr(path) in str(raised.value) and "command.output_paths" in str(raised.value)


def test_a_255_byte_component_is_accepted():
    assert resolve_output_path((), "x" * 255, "entry") == ("x" * 255,)


def test_output_paths_keep_the_clients_spelling_and_drop_exact_repetitions():
    specs = output_specs(WORKDIR, [".", "../../../buildstream-install", "."], ["ignored"], ["ignored"])
    assert [(s.path, s.components, s.kind) for s in specs] == [
        (".", WORKDIR, OutputKind.PATH),
        ("../../../buildstream-install", ("buildstream-install",), OutputKind.PATH),
    ]


def test_two_spellings_of_one_place_are_each_reported():
    specs = output_specs((), ["a", "./a"], [], [])
    assert [(s.path, s.components) for s in specs] == [("a", ("a",)), ("./a", ("a",))]


def test_legacy_path_listed_as_file_and_directory_is_refused():
    with pytest.raises(InvalidArgument, match="both list 'out'"):
        output_specs((), [], ["out"], ["out"])


def test_legacy_output_file_naming_the_working_directory_is_refused():
    with pytest.raises(InvalidArgument, match="output_files entry '.'"):
        output_specs(("w",), [], ["."], [])


def test_legacy_output_directory_may_be_the_input_root():
    (spec,) = output_specs(("w",), [], [], [".."])
    assert (spec.components, spec.kind) == ((), OutputKind.DIRECTORY)


def test_legacy_duplicates_are_reported_once():
    specs = output_specs((), [], ["f", "f"], ["d", "d"])
    assert [(s.path, s.kind) for s in specs] == [("f", OutputKind.FILE), ("d", OutputKind.DIRECTORY)]

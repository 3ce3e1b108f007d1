"""The one door to the generated protocol messages.

Every other module imports REAPI v2, Remote Workers v1test2, ByteStream, longrunning,
google.rpc and buildbox messages from here, never from ``buildgrid.common`` directly, so
that the generated code's location is known in exactly one place.
"""

from buildgrid.common.protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
    remote_execution_pb2_grpc as re_grpc,
)
from buildgrid.common.protos.build.buildbox import execution_stats_pb2
from buildgrid.common.protos.google.bytestream import (
    bytestream_pb2,
    bytestream_pb2_grpc,
)
from buildgrid.common.protos.google.devtools.remoteworkers.v1test2 import (
    bots_pb2,
    bots_pb2_grpc,
    worker_pb2,
)
from buildgrid.common.protos.google.longrunning import (
    operations_pb2,
    operations_pb2_grpc,
)
from buildgrid.common.protos.google.rpc import code_pb2, error_details_pb2, status_pb2

__all__ = [
    "re_pb2",
    "re_grpc",
    "execution_stats_pb2",
    "bytestream_pb2",
    "bytestream_pb2_grpc",
    "bots_pb2",
    "bots_pb2_grpc",
    "worker_pb2",
    "operations_pb2",
    "operations_pb2_grpc",
    "code_pb2",
    "error_details_pb2",
    "status_pb2",
]

"""Stand-in for @rules_java: the native Java rules Bazel 4 has built in (loaded by
@bazel_tools//tools/jdk, which every build parses; no Java is built here)."""

java_binary = native.java_binary
java_import = native.java_import
java_library = native.java_library
java_package_configuration = native.java_package_configuration
java_plugin = native.java_plugin
java_runtime = native.java_runtime
java_test = native.java_test
java_toolchain = native.java_toolchain

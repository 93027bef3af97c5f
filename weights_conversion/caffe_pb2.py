"""Caffe protobuf message classes, built at import time from ``caffe.proto`` (no protoc).

``caffe.proto`` beside this file is the single source of truth. This module parses its
restricted proto2 subset (``syntax``, ``package``, top-level and nested ``message`` / ``enum``,
``optional`` / ``repeated`` / ``required`` scalar, enum and message fields, ``[default = ...]``
and ``[packed = ...]`` options, ``//`` comments) into a ``FileDescriptorProto``, adds it to a
private ``DescriptorPool`` and creates the classes with ``message_factory.GetMessageClass``.

Why not ``protoc``-generated code: generated ``*_pb2.py`` files pin the protobuf runtime major
version (protobuf 7 warns on older gencode, older runtimes refuse newer gencode); a descriptor
built at run time works with any protobuf >= 4 and needs no build step.

Usage mirrors generated code: ``caffe_pb2.NetParameter()``, ``caffe_pb2.BlobProto()``,
``caffe_pb2.V1LayerParameter.CONVOLUTION``, ``caffe_pb2.PoolingParameter.MAX``.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO_PATH = pathlib.Path(__file__).with_name("caffe.proto")

_FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _FDP.TYPE_DOUBLE,
    "float": _FDP.TYPE_FLOAT,
    "int32": _FDP.TYPE_INT32,
    "int64": _FDP.TYPE_INT64,
    "uint32": _FDP.TYPE_UINT32,
    "uint64": _FDP.TYPE_UINT64,
    "sint32": _FDP.TYPE_SINT32,
    "sint64": _FDP.TYPE_SINT64,
    "bool": _FDP.TYPE_BOOL,
    "string": _FDP.TYPE_STRING,
    "bytes": _FDP.TYPE_BYTES,
}
_LABELS = {
    "optional": _FDP.LABEL_OPTIONAL,
    "repeated": _FDP.LABEL_REPEATED,
    "required": _FDP.LABEL_REQUIRED,
}
_TOKEN = re.compile(r'\s*(?:(//[^\n]*)|("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')|([-+.\w]+)|(\S))')


class ProtoSyntaxError(ValueError):
    """``caffe.proto`` uses syntax outside the subset this loader understands."""


def _tokenize(text: str) -> list[str]:
    tokens = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:  # only trailing whitespace is left
            break
        pos = m.end()
        if m.group(1) is None:
            tokens.append(m.group(2) or m.group(3) or m.group(4))
    return tokens


class _Parser:
    def __init__(self, text: str, path: pathlib.Path) -> None:
        self.tokens = _tokenize(text)
        self.i = 0
        self.path = path
        # (field proto, its scope as a list of names, the type name as written)
        self.unresolved: list[tuple[Any, list[str], str]] = []
        self.package = ""

    def _error(self, msg: str) -> ProtoSyntaxError:
        near = " ".join(self.tokens[max(0, self.i - 3) : self.i + 3])
        return ProtoSyntaxError(f"{self.path}: {msg} (near: {near!r})")

    def peek(self) -> str:
        if self.i >= len(self.tokens):
            raise self._error("unexpected end of file")
        return self.tokens[self.i]

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if expected is not None and tok != expected:
            raise self._error(f"expected {expected!r}, got {tok!r}")
        self.i += 1
        return tok

    def parse_file(self) -> descriptor_pb2.FileDescriptorProto:
        fdp = descriptor_pb2.FileDescriptorProto(name="fgloc_caffe.proto", syntax="proto2")
        while self.i < len(self.tokens):
            tok = self.take()
            if tok == "syntax":
                self.take("=")
                if self.take().strip("\"'") != "proto2":
                    raise self._error("only proto2 is supported")
                self.take(";")
            elif tok == "package":
                self.package = self.take()
                fdp.package = self.package
                self.take(";")
            elif tok == "message":
                self.parse_message(fdp.message_type.add(), [])
            elif tok == "enum":
                self.parse_enum(fdp.enum_type.add())
            else:
                raise self._error(f"unsupported top-level statement {tok!r}")
        return fdp

    def parse_enum(self, edp: descriptor_pb2.EnumDescriptorProto) -> None:
        edp.name = self.take()
        self.take("{")
        while self.peek() != "}":
            value = edp.value.add(name=self.take())
            self.take("=")
            value.number = int(self.take())
            self.take(";")
        self.take("}")

    def parse_message(self, mdp: descriptor_pb2.DescriptorProto, scope: list[str]) -> None:
        mdp.name = self.take()
        inner = [*scope, mdp.name]
        self.take("{")
        while self.peek() != "}":
            tok = self.take()
            if tok == "message":
                self.parse_message(mdp.nested_type.add(), inner)
            elif tok == "enum":
                self.parse_enum(mdp.enum_type.add())
            elif tok in _LABELS:
                self.parse_field(mdp.field.add(label=_LABELS[tok]), inner)
            else:
                raise self._error(f"unsupported statement {tok!r} in message {mdp.name}")
        self.take("}")

    def parse_field(self, fp: Any, scope: list[str]) -> None:
        type_name = self.take()
        fp.name = self.take()
        fp.json_name = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), fp.name)
        self.take("=")
        fp.number = int(self.take())
        if type_name in _SCALARS:
            fp.type = _SCALARS[type_name]
        else:
            self.unresolved.append((fp, scope, type_name))
        if self.peek() == "[":
            self.take("[")
            while True:
                key = self.take()
                self.take("=")
                value = self.take()
                if key == "default":
                    fp.default_value = _default_text(type_name, value)
                elif key == "packed":
                    fp.options.packed = value == "true"
                else:
                    raise self._error(f"unsupported field option {key!r}")
                if self.take() == "]":
                    break
        self.take(";")


def _default_text(type_name: str, value: str) -> str:
    """The text form FieldDescriptorProto.default_value expects for a proto2 default."""
    if type_name in ("string", "bytes"):
        return value[1:-1]
    if type_name in ("float", "double"):
        return repr(float(value))
    return value  # ints, bools ("true"/"false") and enum value names are stored as written


def _collect_names(fdp: descriptor_pb2.FileDescriptorProto) -> dict[str, int]:
    """Fully qualified name (no leading dot) -> TYPE_MESSAGE / TYPE_ENUM."""
    names: dict[str, int] = {}

    def visit(mdp: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        full = f"{prefix}.{mdp.name}"
        names[full] = _FDP.TYPE_MESSAGE
        for e in mdp.enum_type:
            names[f"{full}.{e.name}"] = _FDP.TYPE_ENUM
        for nested in mdp.nested_type:
            visit(nested, full)

    for e in fdp.enum_type:
        names[f"{fdp.package}.{e.name}"] = _FDP.TYPE_ENUM
    for mdp in fdp.message_type:
        visit(mdp, fdp.package)
    return names


def build_file_descriptor(path: pathlib.Path = PROTO_PATH) -> descriptor_pb2.FileDescriptorProto:
    """Parse ``path`` (a proto2 schema in the supported subset) into a FileDescriptorProto."""
    parser = _Parser(path.read_text(encoding="utf-8"), path)
    fdp = parser.parse_file()
    names = _collect_names(fdp)
    for fp, scope, written in parser.unresolved:
        # proto scoping: innermost enclosing scope first, then outwards to the package.
        candidates = [
            ".".join([fdp.package, *scope[:k], written]) for k in range(len(scope), -1, -1)
        ]
        found = next((c for c in candidates if c in names), None)
        if found is None:
            raise ProtoSyntaxError(f"{path}: unknown type {written!r} of field {fp.name!r}")
        fp.type = names[found]
        fp.type_name = "." + found
    return fdp


_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(build_file_descriptor().SerializeToString())
_FILE = _POOL.FindFileByName("fgloc_caffe.proto")


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(_FILE.message_types_by_name[name])


BlobShape: Any = _message("BlobShape")
BlobProto: Any = _message("BlobProto")
BlobProtoVector: Any = _message("BlobProtoVector")
FillerParameter: Any = _message("FillerParameter")
NetParameter: Any = _message("NetParameter")
NetState: Any = _message("NetState")
NetStateRule: Any = _message("NetStateRule")
ParamSpec: Any = _message("ParamSpec")
LayerParameter: Any = _message("LayerParameter")
V1LayerParameter: Any = _message("V1LayerParameter")
TransformationParameter: Any = _message("TransformationParameter")
ConcatParameter: Any = _message("ConcatParameter")
ConvolutionParameter: Any = _message("ConvolutionParameter")
DropoutParameter: Any = _message("DropoutParameter")
EltwiseParameter: Any = _message("EltwiseParameter")
FlattenParameter: Any = _message("FlattenParameter")
InnerProductParameter: Any = _message("InnerProductParameter")
InputParameter: Any = _message("InputParameter")
LRNParameter: Any = _message("LRNParameter")
PoolingParameter: Any = _message("PoolingParameter")
ReLUParameter: Any = _message("ReLUParameter")
SoftmaxParameter: Any = _message("SoftmaxParameter")
TRAIN = 0
TEST = 1

"""Model repository: config.pbtxt parsing, validation, completion from a real ONNX model, and layout.

Also checks that our `inference.ModelConfig` is wire-compatible with tritonclient's and lives beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, text_format

from kernelport import protocol
from kernelport.errors import ConfigError
from kernelport.protocol import compile_descriptor_set, message_class
from kernelport.repository import (
    DATATYPES,
    ModelSpec,
    TensorSig,
    complete_config,
    config_type_to_datatype,
    config_type_to_numpy,
    datatype_itemsize,
    datatype_to_config_enum,
    datatype_to_config_type,
    datatype_to_numpy,
    load_model,
    load_repository,
    model_config_class,
    numpy_to_datatype,
    ort_type_to_datatype,
    parse_config,
    platform_of,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")

# --------------------------------------------------------------------------------------------- configs

ADD_SUB = """
name: "add_sub"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { specific: { versions: [1, 3] } }
input [
  {
    name: "INPUT0"
    data_type: TYPE_FP32
    dims: [ 16 ]
  },
  {
    name: "INPUT1"
    data_type: TYPE_FP32
    dims: [ 16 ]
    optional: true
  }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] label_filename: "labels.txt" }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  preserve_ordering: true
  priority_levels: 2
  default_priority_level: 1
  default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 5000 max_queue_size: 64 }
  priority_queue_policy { key: 1 value { timeout_action: REJECT allow_timeout_override: true } }
}
instance_group [
  { name: "gpu_group" kind: KIND_GPU count: 2 gpus: [ 0, 1 ] },
  { count: 1 kind: KIND_CPU }
]
parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
parameters: { key: "execution_mode" value: { string_value: "sequential" } }
response_cache { enable: true }
model_transaction_policy { decoupled: false }
"""

OPTIMIZATION = """
name: "resnet"
backend: "onnxruntime"
max_batch_size: 16
input [ { name: "x" data_type: TYPE_FP16 format: FORMAT_NCHW dims: [ 3, 224, 224 ] } ]
output [ { name: "y" data_type: TYPE_FP16 dims: [ 1000 ] } ]
optimization {
  priority: PRIORITY_MAX
  graph { level: 1 }
  execution_accelerators {
    gpu_execution_accelerator : [ {
      name : "tensorrt"
      parameters { key: "precision_mode" value: "FP16" }
      parameters { key: "max_workspace_size_bytes" value: "1073741824" }
    } ]
    cpu_execution_accelerator : [ { name : "openvino" } ]
  }
  cuda {
    graphs: true
    busy_wait_events: true
    output_copy_stream: true
    graph_spec [ { batch_size: 4 input { key: "x" value { dim: [ 3, 224, 224 ] } }
                   graph_lower_bound { batch_size: 1 input { key: "x" value { dim: [ 3, 224, 224 ] } } } } ]
  }
  input_pinned_memory { enable: false }
  output_pinned_memory { enable: true }
  gather_kernel_buffer_threshold: 8
  eager_batching: true
}
model_operations { op_library_filename: "libcustom.so" }
model_repository_agents { agents [ { name: "checksum" parameters { key: "MD5:model.onnx" value: "abc" } } ] }
metric_tags { key: "team" value: "vision" }
cc_model_filenames { key: "8.6" value: "model_sm86.plan" }
"""

SEQUENCE = """
name: "accumulate"
backend: "onnxruntime"
max_batch_size: 4
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  oldest { max_candidate_sequences: 4 preferred_batch_size: [ 2, 4 ] max_queue_delay_microseconds: 100 }
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END bool_false_true: [ false, true ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
  state [ {
    input_name: "INPUT_STATE"
    output_name: "OUTPUT_STATE"
    data_type: TYPE_INT32
    dims: [ -1 ]
    initial_state: { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true name: "init" }
    use_same_buffer_for_input_output: true
    use_growable_memory: true
  } ]
  iterative_sequence: false
}
"""

WARMUP = """
name: "warm"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] },
        { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] reshape: { shape: [ ] } } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
model_warmup [
  {
    name: "zeros"
    batch_size: 4
    count: 2
    inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } }
    inputs { key: "TEXT" value: { data_type: TYPE_STRING dims: [ 1 ] input_data_file: "text.bin" } }
  },
  { name: "random" batch_size: 1
    inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] random_data: true } } }
]
batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "N" data_type: TYPE_FP32 source_input: "INPUT0" } ]
batch_output [ { target_name: "OUTPUT0" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "INPUT0" } ]
"""

ENSEMBLE = """
name: "pipeline"
platform: "ensemble"
max_batch_size: 8
version_policy: { latest: { num_versions: 2 } }
input [ { name: "RAW" data_type: TYPE_UINT8 dims: [ -1 ] } ]
output [ { name: "SCORES" data_type: TYPE_FP32 dims: [ 1000 ] } ]
ensemble_scheduling {
  step [
    { model_name: "preprocess" model_version: -1 input_map { key: "IN" value: "RAW" }
      output_map { key: "OUT" value: "image" } },
    { model_name: "resnet" model_version: -1 input_map { key: "x" value: "image" }
      output_map { key: "y" value: "SCORES" } }
  ]
}
"""

ALL_CONFIGS = {
    "add_sub": ADD_SUB,
    "resnet": OPTIMIZATION,
    "accumulate": SEQUENCE,
    "warm": WARMUP,
    "pipeline": ENSEMBLE,
}


def test_add_sub_config_parses() -> None:
    cfg: Any = parse_config(ADD_SUB)
    assert cfg.name == "add_sub" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert list(cfg.version_policy.specific.versions) == [1, 3]
    assert [t.name for t in cfg.input] == ["INPUT0", "INPUT1"]
    assert cfg.input[0].data_type == 11 and list(cfg.input[0].dims) == [16] and cfg.input[1].optional
    assert cfg.output[1].label_filename == "labels.txt"
    db = cfg.dynamic_batching
    assert list(db.preferred_batch_size) == [4, 8] and db.max_queue_delay_microseconds == 100
    assert db.preserve_ordering and db.priority_levels == 2 and db.default_priority_level == 1
    assert db.default_queue_policy.timeout_action == 1  # DELAY
    assert db.default_queue_policy.max_queue_size == 64
    assert db.priority_queue_policy[1].allow_timeout_override
    assert cfg.instance_group[0].kind == 1 and list(cfg.instance_group[0].gpus) == [0, 1]
    assert cfg.parameters["intra_op_thread_count"].string_value == "2"
    assert cfg.parameters["execution_mode"].string_value == "sequential"
    assert cfg.response_cache.enable
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"


def test_optimization_config_parses() -> None:
    cfg: Any = parse_config(OPTIMIZATION)
    opt = cfg.optimization
    assert opt.priority == 1 and opt.graph.level == 1
    gpu = opt.execution_accelerators.gpu_execution_accelerator
    assert gpu[0].name == "tensorrt" and dict(gpu[0].parameters) == {
        "precision_mode": "FP16",
        "max_workspace_size_bytes": "1073741824",
    }
    assert opt.execution_accelerators.cpu_execution_accelerator[0].name == "openvino"
    assert opt.cuda.graphs and opt.cuda.busy_wait_events and opt.cuda.output_copy_stream
    assert list(opt.cuda.graph_spec[0].input["x"].dim) == [3, 224, 224]
    assert opt.cuda.graph_spec[0].graph_lower_bound.batch_size == 1
    assert opt.output_pinned_memory.enable and not opt.input_pinned_memory.enable
    assert opt.gather_kernel_buffer_threshold == 8 and opt.eager_batching
    assert cfg.input[0].format == 2  # FORMAT_NCHW
    assert cfg.model_repository_agents.agents[0].parameters["MD5:model.onnx"] == "abc"
    assert cfg.metric_tags["team"] == "vision" and cfg.cc_model_filenames["8.6"] == "model_sm86.plan"
    assert list(cfg.model_operations.op_library_filename) == ["libcustom.so"]


def test_sequence_config_parses() -> None:
    cfg: Any = parse_config(SEQUENCE)
    sb = cfg.sequence_batching
    assert cfg.WhichOneof("scheduling_choice") == "sequence_batching"
    assert sb.WhichOneof("strategy_choice") == "oldest" and list(sb.oldest.preferred_batch_size) == [2, 4]
    assert sb.max_sequence_idle_microseconds == 5_000_000
    assert [c.name for c in sb.control_input] == ["START", "READY", "END", "CORRID"]
    assert list(sb.control_input[0].control[0].fp32_false_true) == [0.0, 1.0]
    assert list(sb.control_input[2].control[0].bool_false_true) == [False, True]
    assert sb.control_input[3].control[0].kind == 3 and sb.control_input[3].control[0].data_type == 5
    state = sb.state[0]
    assert state.input_name == "INPUT_STATE" and list(state.dims) == [-1]
    assert state.initial_state[0].WhichOneof("state_data") == "zero_data" and state.use_growable_memory


def test_warmup_and_ensemble_configs_parse() -> None:
    warm: Any = parse_config(WARMUP)
    assert [w.name for w in warm.model_warmup] == ["zeros", "random"]
    zeros = warm.model_warmup[0]
    assert zeros.batch_size == 4 and zeros.count == 2
    assert zeros.inputs["INPUT0"].WhichOneof("input_data_type") == "zero_data"
    assert zeros.inputs["TEXT"].input_data_file == "text.bin" and zeros.inputs["TEXT"].data_type == 13
    assert warm.model_warmup[1].inputs["INPUT0"].random_data
    assert warm.batch_input[0].source_input == ["INPUT0"] and warm.batch_output[0].target_name == ["OUTPUT0"]
    ens: Any = parse_config(ENSEMBLE)
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["preprocess", "resnet"]
    assert dict(steps[1].output_map) == {"y": "SCORES"} and steps[0].model_version == -1
    assert ens.version_policy.latest.num_versions == 2


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_round_trip_text_message_text(name: str) -> None:
    first = parse_config(ALL_CONFIGS[name])
    text = text_format.MessageToString(first)
    second = parse_config(text)
    assert second == first
    assert text_format.MessageToString(second) == text
    # and through bytes
    assert model_config_class().FromString(first.SerializeToString()) == first


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_real_configs_validate(name: str) -> None:
    spec = ModelSpec.from_proto(parse_config(ALL_CONFIGS[name]), model_name=name)
    assert spec.name == name and spec.inputs and spec.outputs


def test_model_spec_fields() -> None:
    msg = parse_config(ADD_SUB)
    spec = ModelSpec.from_proto(msg, source="/repo/add_sub/config.pbtxt", model_name="add_sub")
    assert spec.proto is msg
    assert (spec.name, spec.platform, spec.backend, spec.max_batch_size) == (
        "add_sub",
        "onnxruntime_onnx",
        "",
        8,
    )
    assert [t.name for t in spec.inputs] == ["INPUT0", "INPUT1"]
    in0 = spec.input("INPUT0")
    assert in0.dtype == np.dtype(np.float32) and in0.datatype == "FP32" and in0.dims == (16,)
    assert in0.reshape is None and not in0.optional and spec.input("INPUT1").optional
    assert spec.preferred_batch_sizes == (4, 8) and spec.max_queue_delay_us == 100 and spec.dynamic_batching
    # 2 instances on each of 2 GPUs, plus 1 on the CPU
    assert spec.instance_count == 5 and spec.instance_kind == "KIND_GPU"
    assert spec.instance_groups[1].kind == "KIND_CPU" and spec.instance_groups[0].gpus == (0, 1)
    assert spec.parameters == {"intra_op_thread_count": "2", "execution_mode": "sequential"}
    assert spec.default_model_filename == "" and spec.batching

    warm = ModelSpec.from_proto(parse_config(WARMUP))
    text = warm.input("TEXT")
    assert text.datatype == "BYTES" and text.dtype == np.dtype(object) and text.reshape == ()
    assert warm.instance_count == 1 and warm.instance_kind == "KIND_AUTO" and not warm.dynamic_batching


# ------------------------------------------------------------------------------------------ validation

_IN = 'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
_OUT = 'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'

INVALID = [
    ("max_batch_size: -1\n" + _IN + _OUT, "max_batch_size must be >= 0, got -1"),
    (
        'max_batch_size: 4\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 0, 16 ] } ]\n' + _OUT,
        "input 'INPUT0': dims must be positive or -1, got [0, 16]",
    ),
    (
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -2 ] } ]\n' + _OUT,
        "dims must be positive or -1",
    ),
    ('input [ { name: "INPUT0" dims: [ 16 ] } ]\n' + _OUT, "input 'INPUT0': data_type is not set"),
    ('input [ { name: "INPUT0" data_type: TYPE_FP32 } ]\n' + _OUT, "input 'INPUT0': dims must not be empty"),
    (_IN + 'output [ { name: "OUTPUT0" dims: [ 16 ] } ]', "output 'OUTPUT0': data_type is not set"),
    (_IN + _IN + _OUT, "input 'INPUT0': name appears more than once"),
    (_IN + _OUT + _OUT, "output 'OUTPUT0': name appears more than once"),
    ("input [ { data_type: TYPE_FP32 dims: [ 16 ] } ]\n" + _OUT, "an input has no name"),
    (
        "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 4, 16 ] }\n" + _IN + _OUT,
        "dynamic_batching.preferred_batch_size 16 is not in 1..8",
    ),
    (
        "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 0 ] }\n" + _IN + _OUT,
        "dynamic_batching.preferred_batch_size 0 is not in 1..8",
    ),
    ("dynamic_batching { }\n" + _IN + _OUT, "dynamic_batching needs max_batch_size >= 1"),
    (
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4, 4 ] reshape: { shape: [ 15 ] } } ]\n'
        + _OUT,
        "input 'INPUT0': reshape.shape [15] holds 15 elements but dims [4, 4] hold 16",
    ),
    (
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 0 ] } } ]\n' + _OUT,
        "input 'INPUT0': reshape.shape must be positive or -1",
    ),
    ('name: "other"\n' + _IN + _OUT, "name 'other' must equal the model's directory name 'x'"),
    (
        _IN + _OUT + "instance_group [ { count: -1 } ]",
        "instance_group 'instance_group[0]': count must be >= 1",
    ),
]


@pytest.mark.parametrize(("text", "expected"), INVALID, ids=[e for _, e in INVALID])
def test_validation_errors_name_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    model_dir = tmp_path / "x"
    model_dir.mkdir()
    path = model_dir / "config.pbtxt"
    path.write_text(text)
    msg = parse_config(path)
    with pytest.raises(ConfigError) as info:
        ModelSpec.from_proto(msg, source=path, model_name="x")
    assert str(info.value).startswith("config.pbtxt of model 'x': ")
    assert expected in str(info.value)
    assert str(tmp_path) not in str(info.value)  # names the file, not where it lives


def test_validation_error_message_exact() -> None:
    msg = parse_config(
        'max_batch_size: 4\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 0, 16 ] } ]\n' + _OUT
    )
    with pytest.raises(ConfigError) as info:
        ModelSpec.from_proto(msg, model_name="x")
    assert (
        str(info.value)
        == "config.pbtxt of model 'x': input 'INPUT0': dims must be positive or -1, got [0, 16]"
    )


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ('name: "x"\nmax_batch_size: 8\nmax_batch_sise: 4\n', 3, "max_batch_sise"),
        ('input [ { name: "a"\n data_type: TYPE_FP33 dims: [ 1 ] } ]', 2, "TYPE_FP33"),
        ('name: "x"\ninput { name: "a" dims: [ 1, "two" ] }', 2, "dims"),
        ("dynamic_batching { }\nsequence_batching { }\n", 2, "sequence_batching"),
        ("max_batch_size: 8\nmax_batch_size: 4\n", 2, "max_batch_size"),
    ],
)
def test_parse_errors_name_file_line_and_field(tmp_path: Path, text: str, line: int, field: str) -> None:
    path = tmp_path / "mymodel" / "config.pbtxt"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_config(path)
    message = str(info.value)
    assert message.startswith(f"config.pbtxt of model 'mymodel': line {line}")
    assert field in message
    with pytest.raises(ConfigError, match=f"^config.pbtxt of model 'm': line {line}"):
        parse_config(text, model_name="m")


def test_parse_config_path_forms(tmp_path: Path) -> None:
    path = tmp_path / "m" / "config.pbtxt"
    path.parent.mkdir()
    path.write_text(ADD_SUB)
    assert parse_config(path) == parse_config(str(path)) == parse_config(ADD_SUB)
    with pytest.raises(ConfigError, match="config.pbtxt of model 'gone': file not found"):
        parse_config(tmp_path / "gone" / "config.pbtxt")
    assert parse_config("") == model_config_class()()


# ------------------------------------------------------------------------------------------------ dtypes


def test_dtype_table_matches_the_proto_enum() -> None:
    enum = model_config_class().DESCRIPTOR.file.enum_types_by_name["DataType"]
    assert [v.name for v in enum.values] == ["TYPE_INVALID"] + [datatype_to_config_type(d) for d in DATATYPES]
    for value in enum.values[1:]:
        datatype = config_type_to_datatype(value.number)
        assert config_type_to_datatype(value.name) == datatype
        assert datatype_to_config_enum(datatype) == value.number
    with pytest.raises(ValueError):
        config_type_to_datatype(0)


def test_dtype_mappings() -> None:
    assert (
        config_type_to_datatype("TYPE_STRING") == "BYTES"
        and datatype_to_config_type("BYTES") == "TYPE_STRING"
    )
    assert datatype_to_numpy("BYTES") == np.dtype(object) and config_type_to_numpy(11) == np.dtype(np.float32)
    for datatype in DATATYPES:
        dtype = datatype_to_numpy(datatype)
        if dtype is None:
            continue
        assert numpy_to_datatype(dtype) == datatype
        if datatype != "BYTES":
            assert datatype_itemsize(datatype) == dtype.itemsize == np.zeros(1, dtype).nbytes
    assert numpy_to_datatype(np.array([b"ab"]).dtype) == "BYTES"
    assert numpy_to_datatype(np.array(["ab"]).dtype) == "BYTES"
    assert numpy_to_datatype(np.float16) == "FP16"
    with pytest.raises(ValueError):
        numpy_to_datatype(np.dtype(np.complex64))
    with pytest.raises(ValueError):  # byte-swapped data is not FP32 on the wire
        numpy_to_datatype(np.dtype(np.float32).newbyteorder("S"))
    with pytest.raises(ValueError):
        datatype_to_numpy("FP8")


def test_bf16_uses_ml_dtypes_when_present() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert datatype_to_numpy("BF16") == np.dtype(ml_dtypes.bfloat16)
    assert numpy_to_datatype(np.dtype(ml_dtypes.bfloat16)) == "BF16"
    assert datatype_itemsize("BF16") == 2 and config_type_to_datatype("TYPE_BF16") == "BF16"


def test_ort_types() -> None:
    assert ort_type_to_datatype("tensor(float)") == "FP32"
    assert ort_type_to_datatype("tensor(double)") == "FP64"
    assert ort_type_to_datatype("tensor(float16)") == "FP16"
    assert ort_type_to_datatype("tensor(string)") == "BYTES"
    assert ort_type_to_datatype("tensor(int64)") == "INT64"
    assert ort_type_to_datatype("tensor(bool)") == "BOOL"
    with pytest.raises(ValueError):
        ort_type_to_datatype("seq(tensor(float))")


# ------------------------------------------------------------------------------- completion from ONNX


def _write_add_sub_onnx(path: Path, batch: int | str = "batch", width: int = 16) -> None:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1, FP32 [batch, width]."""
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    shape = [batch, width]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n in ("OUTPUT0", "OUTPUT1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def _ort_signature(model_path: str) -> tuple[list[TensorSig], list[TensorSig], bool]:
    """The model's IO as onnxruntime reports it; symbolic or unknown dims become -1."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])

    def sig(node: Any) -> TensorSig:
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
        return TensorSig(node.name, ort_type_to_datatype(node.type), shape)

    inputs = [sig(n) for n in session.get_inputs()]
    outputs = [sig(n) for n in session.get_outputs()]
    can_batch = all(s.shape and s.shape[0] == -1 for s in inputs + outputs)
    return inputs, outputs, can_batch


def _run_onnx(model_path: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


@pytest.fixture
def onnx_repo(tmp_path: Path) -> Path:
    """A repository with add_sub (batchable) and add_sub_fixed (first dim fixed at 2), both without config."""
    _write_add_sub_onnx(tmp_path / "add_sub" / "1" / "model.onnx")
    _write_add_sub_onnx(tmp_path / "add_sub_fixed" / "1" / "model.onnx", batch=2)
    return tmp_path


def test_complete_config_without_config_pbtxt(onnx_repo: Path) -> None:
    entry = load_repository(onnx_repo)["add_sub"]
    assert not entry.has_config and platform_of(entry) == "onnxruntime"
    cfg: Any = entry.config
    assert (cfg.name, cfg.platform, cfg.backend, len(cfg.input)) == (
        "add_sub",
        "onnxruntime_onnx",
        "onnxruntime",
        0,
    )
    model_path = entry.model_file()
    inputs, outputs, can_batch = _ort_signature(model_path)
    assert can_batch

    done: Any = complete_config(entry.config, inputs, outputs, can_batch)
    assert len(cfg.input) == 0  # the original is left alone
    assert done.max_batch_size == 4 and done.HasField("dynamic_batching")
    spec = ModelSpec.from_proto(done, model_name="add_sub")
    assert [(t.name, t.datatype, t.dims) for t in spec.inputs] == [
        ("INPUT0", "FP32", (16,)),
        ("INPUT1", "FP32", (16,)),
    ]
    assert [(t.name, t.datatype, t.dims) for t in spec.outputs] == [
        ("OUTPUT0", "FP32", (16,)),
        ("OUTPUT1", "FP32", (16,)),
    ]

    # The completed spec describes the model: a batch shaped by it runs and gives numpy's answer.
    rng = np.random.default_rng(0)
    batch = {t.name: rng.standard_normal((spec.max_batch_size, *t.dims)).astype(t.dtype) for t in spec.inputs}
    out0, out1 = _run_onnx(model_path, batch)
    np.testing.assert_allclose(out0, batch["INPUT0"] + batch["INPUT1"], rtol=1e-6)
    np.testing.assert_allclose(out1, batch["INPUT0"] - batch["INPUT1"], rtol=1e-6)


def test_complete_config_fixed_batch_dim_means_no_batching(onnx_repo: Path) -> None:
    entry = load_repository(onnx_repo)["add_sub_fixed"]
    inputs, outputs, can_batch = _ort_signature(entry.model_file())
    assert not can_batch
    spec = ModelSpec.from_proto(
        complete_config(entry.config, inputs, outputs, can_batch), model_name="add_sub_fixed"
    )
    assert spec.max_batch_size == 0 and not spec.dynamic_batching
    assert spec.input("INPUT0").dims == (2, 16)


def test_complete_partial_config(onnx_repo: Path) -> None:
    (onnx_repo / "add_sub" / "config.pbtxt").write_text(
        'max_batch_size: 8\ninput [ { name: "INPUT1" dims: [ 16 ] } ]\n'
        'output [ { name: "OUTPUT1" data_type: TYPE_FP32 } ]\n'
        "dynamic_batching { preferred_batch_size: [ 8 ] }\n"
    )
    entry = load_model(onnx_repo, "add_sub")
    assert entry.has_config
    inputs, outputs, can_batch = _ort_signature(entry.model_file())
    done: Any = complete_config(entry.config, inputs, outputs, can_batch)
    spec = ModelSpec.from_proto(done, model_name="add_sub")
    assert spec.max_batch_size == 8 and spec.preferred_batch_sizes == (8,)
    # the config's order first, then what it left out in the model's order
    assert [t.name for t in spec.inputs] == ["INPUT1", "INPUT0"]
    assert [t.name for t in spec.outputs] == ["OUTPUT1", "OUTPUT0"]
    assert all(t.datatype == "FP32" and t.dims == (16,) for t in spec.inputs + spec.outputs)


def test_complete_config_full_rank_dims_mean_no_batching(onnx_repo: Path) -> None:
    entry = load_model(onnx_repo, "add_sub")
    msg: Any = entry.config
    text_format.Parse('input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, 16 ] } ]', msg)
    inputs, outputs, can_batch = _ort_signature(entry.model_file())
    spec = ModelSpec.from_proto(complete_config(msg, inputs, outputs, can_batch), model_name="add_sub")
    assert spec.max_batch_size == 0 and not spec.dynamic_batching
    assert spec.input("INPUT1").dims == (-1, 16) and spec.output("OUTPUT0").dims == (-1, 16)


def test_complete_config_scalar_item_is_reshaped(tmp_path: Path) -> None:
    _write_add_sub_onnx(tmp_path / "m" / "1" / "model.onnx", width=1)
    inputs, outputs, can_batch = _ort_signature(str(tmp_path / "m" / "1" / "model.onnx"))
    squeezed = [TensorSig(s.name, s.datatype, s.shape[:1]) for s in inputs]  # a model with shape [batch]
    done: Any = complete_config(model_config_class()(name="m"), squeezed, outputs, can_batch)
    spec = ModelSpec.from_proto(done)
    assert spec.input("INPUT0").dims == (1,) and spec.input("INPUT0").reshape == ()
    assert spec.output("OUTPUT0").dims == (1,) and spec.output("OUTPUT0").reshape is None


MISMATCHES = [
    (
        'input [ { name: "INPUT0" data_type: TYPE_FP16 dims: [ 16 ] } ]',
        "model 'add_sub' input 'INPUT0': expected datatype FP32, got FP16",
    ),
    (
        'max_batch_size: 4\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 8 ] } ]',
        (
            "model 'add_sub' input 'INPUT0': expected dims [16] "
            "(without the batch dimension, as max_batch_size is 4), got [8]"
        ),
    ),
    (
        'max_batch_size: 4\noutput [ { name: "OUTPUT0" dims: [ -1 ] } ]',
        "model 'add_sub' output 'OUTPUT0': expected dims [16]",
    ),
    (
        'max_batch_size: 4\ninput [ { name: "INPUT0" dims: [ 4, 4 ] } ]',
        "model 'add_sub' input 'INPUT0': expected dims [16]",
    ),
    (
        (
            'input [ { name: "INPUT0" dims: [ 4, 4 ] reshape { shape: [ 16 ] } } ]\n'
            'output [ { name: "OUTPUT0" dims: [ 2, 8 ] reshape { shape: [ 17 ] } } ]'
        ),
        "model 'add_sub' output 'OUTPUT0': expected reshape.shape [16]",
    ),
    (
        'input [ { name: "IMAGE" data_type: TYPE_FP32 dims: [ 16 ] } ]',
        (
            "model 'add_sub' input 'IMAGE': the config names it but the model has no such input "
            "(the model's inputs: INPUT0, INPUT1)"
        ),
    ),
    ('output [ { name: "OUTPUT9" } ]', "model 'add_sub' output 'OUTPUT9'"),
]


@pytest.mark.parametrize(("text", "expected"), MISMATCHES, ids=[e for _, e in MISMATCHES])
def test_complete_config_mismatch_raises(onnx_repo: Path, text: str, expected: str) -> None:
    (onnx_repo / "add_sub" / "config.pbtxt").write_text(text)
    entry = load_model(onnx_repo, "add_sub")
    inputs, outputs, can_batch = _ort_signature(entry.model_file())
    with pytest.raises(ConfigError) as info:
        complete_config(entry.config, inputs, outputs, can_batch)
    assert expected in str(info.value)


def test_complete_config_reshape_that_matches_is_kept(onnx_repo: Path) -> None:
    (onnx_repo / "add_sub" / "config.pbtxt").write_text(
        'max_batch_size: 2\ninput [ { name: "INPUT0" dims: [ 4, 4 ] reshape { shape: [ 16 ] } } ]'
    )
    entry = load_model(onnx_repo, "add_sub")
    inputs, outputs, can_batch = _ort_signature(entry.model_file())
    spec = ModelSpec.from_proto(complete_config(entry.config, inputs, outputs, can_batch))
    assert spec.input("INPUT0").dims == (4, 4) and spec.input("INPUT0").reshape == (16,)
    # a stated max_batch_size leaves the scheduling as the config has it
    assert spec.max_batch_size == 2 and not spec.dynamic_batching


def test_max_batch_size_on_unbatchable_model_raises(onnx_repo: Path) -> None:
    (onnx_repo / "add_sub_fixed" / "config.pbtxt").write_text("max_batch_size: 8")
    entry = load_model(onnx_repo, "add_sub_fixed")
    inputs, outputs, can_batch = _ort_signature(entry.model_file())
    with pytest.raises(
        ConfigError, match=r"model 'add_sub_fixed': max_batch_size is 8 but the model cannot batch"
    ):
        complete_config(entry.config, inputs, outputs, can_batch)


# --------------------------------------------------------------------------------------- repository


def _touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_load_repository_layout(tmp_path: Path) -> None:
    for v in (1, 2, 10):
        _touch(tmp_path / "a" / str(v) / "model.onnx")
    (tmp_path / "a" / "config.pbtxt").write_text('name: "a"\nversion_policy { latest { num_versions: 2 } }')
    _touch(tmp_path / "b" / "3" / "model.pt")
    _touch(tmp_path / "b" / "notes" / "readme.txt")  # not a version: ignored
    _touch(tmp_path / "c" / "1" / "model.savedmodel" / "saved_model.pb")
    (tmp_path / "c" / "config.pbtxt").write_text("version_policy { all { } }")
    _touch(tmp_path / "d" / "1" / "model.plan")
    _touch(tmp_path / "d" / "2" / "model.plan")
    (tmp_path / "d" / "config.pbtxt").write_text(
        'platform: "tensorrt_plan"\nversion_policy { specific { versions: 1 } }'
    )
    _touch(tmp_path / "e" / "1" / "weights.bin")
    (tmp_path / "e" / "config.pbtxt").write_text(
        'backend: "onnxruntime"\ndefault_model_filename: "weights.bin"'
    )
    _touch(tmp_path / ".hidden" / "1" / "model.onnx")  # skipped
    _touch(tmp_path / "README.md")  # skipped

    repo = load_repository(tmp_path)
    assert sorted(repo) == ["a", "b", "c", "d", "e"]
    assert repo["a"].versions == (1, 2, 10) and repo["a"].selected_versions == (2, 10)
    assert repo["a"].model_file() == str(tmp_path / "a" / "10" / "model.onnx")
    assert repo["a"].model_file(1) == str(tmp_path / "a" / "1" / "model.onnx")
    assert repo["b"].versions == (3,) and repo["b"].selected_versions == (3,)
    assert repo["c"].selected_versions == (1,) and repo["d"].selected_versions == (1,)
    assert {n: platform_of(e) for n, e in repo.items()} == {
        "a": "onnxruntime",
        "b": "pytorch",
        "c": "tensorflow",
        "d": "tensorrt",
        "e": "onnxruntime",
    }
    assert repo["e"].model_file() == str(tmp_path / "e" / "1" / "weights.bin")
    b: Any = repo["b"].config
    assert (b.name, b.platform, b.backend) == ("b", "pytorch_libtorch", "pytorch")
    d: Any = repo["d"].config
    assert (d.platform, d.backend) == ("tensorrt_plan", "tensorrt")
    with pytest.raises(ConfigError, match="model 'a' has no version 7"):
        repo["a"].model_file(7)


@pytest.mark.parametrize(
    ("files", "config", "expected"),
    [
        ([], None, "model 'm' has no version directory"),
        (["v1/model.onnx"], None, "model 'm' has no version directory"),
        (
            ["1/model.onnx"],
            "version_policy { specific { versions: [ 1, 4 ] } }",
            "version_policy.specific lists version 4",
        ),
        (
            ["1/model.onnx"],
            "version_policy { latest { } }",
            "version_policy.latest.num_versions must be >= 1",
        ),
        (["1/model.onnx"], 'name: "n"', "config.pbtxt of model 'm': name 'n' must equal"),
        (["1/model.onnx"], 'platform: "python"', "platform 'python' is not supported"),
        (["1/model.onnx"], 'platform: "ensemble"', "platform 'ensemble' is not supported"),
        (["1/model.onnx"], 'backend: "fil"', "backend 'fil' is not supported"),
        (["1/model.onnx"], 'platform: "onnxruntime_onnx" backend: "pytorch"', "disagree"),
        (["1/weights.bin"], None, "model 'm': cannot tell its framework"),
        (["1/model.onnx", "01/model.onnx"], None, "are both version 1"),
        (["1/model.onnx"], "max_batch_size: [", "config.pbtxt of model 'm': line 1"),
    ],
)
def test_repository_errors_name_the_model(
    tmp_path: Path, files: list[str], config: str | None, expected: str
) -> None:
    (tmp_path / "m").mkdir()
    for f in files:
        _touch(tmp_path / "m" / f)
    if config is not None:
        (tmp_path / "m" / "config.pbtxt").write_text(config)
    with pytest.raises(ConfigError) as info:
        load_repository(tmp_path)
    assert expected in str(info.value)
    assert str(tmp_path) not in str(info.value)


def test_model_file_missing(tmp_path: Path) -> None:
    _touch(tmp_path / "m" / "1" / "model.onnx")
    _touch(tmp_path / "m" / "2" / "other.bin")
    (tmp_path / "m" / "config.pbtxt").write_text('backend: "onnxruntime"')
    entry = load_repository(tmp_path)["m"]
    with pytest.raises(ConfigError, match=r"^model 'm' version 2: model.onnx not found$"):
        entry.model_file()


def test_errors_dict_collects_broken_models(tmp_path: Path) -> None:
    _touch(tmp_path / "good" / "1" / "model.onnx")
    (tmp_path / "broken").mkdir()
    errors: dict[str, ConfigError] = {}
    repo = load_repository(tmp_path, errors=errors)
    assert list(repo) == ["good"] and list(errors) == ["broken"]
    assert "model 'broken'" in str(errors["broken"])


@pytest.mark.parametrize("name", ["../x", "..", ".", ".hidden", "a/b", "a\\b", "", "x\x00"])
def test_model_names_must_be_plain(tmp_path: Path, name: str) -> None:
    _touch(tmp_path / "repo" / "ok" / "1" / "model.onnx")
    _touch(tmp_path / "x" / "1" / "model.onnx")  # what '../x' would reach
    with pytest.raises(ConfigError, match="is not a plain directory name"):
        load_model(tmp_path / "repo", name)
    assert load_model(tmp_path / "repo", "ok").name == "ok"
    with pytest.raises(ConfigError, match="model 'nope' is not in the model repository"):
        load_model(tmp_path / "repo", "nope")


def test_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        load_repository(tmp_path / "none")


def test_example_repository_loads_and_validates(example_repo: str) -> None:
    repo = load_repository(example_repo)
    assert repo
    for name, entry in repo.items():
        assert platform_of(entry) == "onnxruntime"
        assert os.path.exists(entry.model_file())
        inputs, outputs, can_batch = _ort_signature(entry.model_file())
        spec = ModelSpec.from_proto(
            complete_config(entry.config, inputs, outputs, can_batch), model_name=name
        )
        assert spec.inputs and spec.outputs


# --------------------------------------------------------------------------- protocol: pool and wire


def test_private_pool() -> None:
    cls = message_class("inference.ModelConfig")
    assert cls.DESCRIPTOR.file.pool is not descriptor_pool.Default()
    assert message_class("inference.ModelConfig") is cls
    with pytest.raises(KeyError, match="inference.NoSuchMessage"):
        message_class("inference.NoSuchMessage")


def test_pool_is_built_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "_pool", None)
    barrier = threading.Barrier(8)
    classes: list[type[Any]] = []

    def load() -> None:
        barrier.wait()
        classes.append(message_class("inference.ModelConfig"))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(classes) == 8 and all(c is classes[0] for c in classes)


def test_descriptors_match_tritonclient() -> None:
    """Every message, field and enum value of tritonclient's model_config has our name, number and type."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    theirs = descriptor_pb2.FileDescriptorProto()
    model_config_pb2.DESCRIPTOR.CopyToProto(theirs)
    ours = descriptor_pb2.FileDescriptorProto()
    model_config_class().DESCRIPTOR.file.CopyToProto(ours)

    def flatten(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def enum(e: Any, prefix: str) -> None:
            out[prefix + e.name] = sorted((v.name, v.number) for v in e.value)

        def message(m: Any, prefix: str) -> None:
            full = prefix + m.name
            out[full] = sorted(
                (
                    f.name,
                    f.number,
                    f.type,
                    f.label,
                    f.type_name,
                    m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else "",
                )
                for f in m.field
            )
            for e in m.enum_type:
                enum(e, full + ".")
            for n in m.nested_type:
                message(n, full + ".")

        for e in fd.enum_type:
            enum(e, "")
        for m in fd.message_type:
            message(m, "")
        return out

    theirs_flat, ours_flat = flatten(theirs), flatten(ours)
    assert sorted(theirs_flat) == sorted(ours_flat)
    for name, fields in theirs_flat.items():
        assert ours_flat[name] == fields, name


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_wire_compatible_with_tritonclient(name: str) -> None:
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    ours = parse_config(ALL_CONFIGS[name])
    theirs = model_config_pb2.ModelConfig.FromString(ours.SerializeToString())
    as_dict = json_format.MessageToDict(ours, preserving_proto_field_name=True)
    assert json_format.MessageToDict(theirs, preserving_proto_field_name=True) == as_dict
    assert text_format.MessageToString(theirs) == text_format.MessageToString(ours)
    # and back: tritonclient's own parse of the text, read by ours
    their_parse = text_format.Parse(ALL_CONFIGS[name], model_config_pb2.ModelConfig())
    assert model_config_class().FromString(their_parse.SerializeToString()) == ours


_ORDER_SCRIPT = """
import sys
from google.protobuf import text_format
def ours():
    from kernelport.protocol import message_class
    return message_class("inference.ModelConfig")
def theirs():
    from tritonclient.grpc import model_config_pb2
    import tritonclient.grpc  # the full client registers its service protos too
    return model_config_pb2.ModelConfig
first, second = (ours, theirs) if sys.argv[1] == "ours-first" else (theirs, ours)
a, b = first(), second()
assert a is not b and a.DESCRIPTOR.file.pool is not b.DESCRIPTOR.file.pool
for cls in (a, b):
    m = text_format.Parse('name: "m" max_batch_size: 2 input { name: "x" data_type: TYPE_FP32 dims: 3 }', cls())
    other = (b if cls is a else a).FromString(m.SerializeToString())
    assert other.input[0].dims == [3] and other.max_batch_size == 2
print("ok")
"""


@pytest.mark.parametrize("order", ["ours-first", "tritonclient-first"])
def test_coexists_with_tritonclient(order: str) -> None:
    pytest.importorskip("tritonclient.grpc")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", _ORDER_SCRIPT, order],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_descriptor_set_is_compiled_and_refreshed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proto_dir = tmp_path / "protos"
    proto_dir.mkdir()
    (proto_dir / "a.proto").write_text('syntax = "proto3";\npackage t;\nmessage A { string x = 1; }\n')
    monkeypatch.setattr(protocol, "PROTO_DIR", proto_dir)
    monkeypatch.setattr(protocol, "_pool", None)
    assert message_class("t.A")(x="hi").x == "hi"
    desc = proto_dir / protocol.DESCRIPTOR_SET_NAME
    assert desc.exists()
    assert not [p for p in proto_dir.iterdir() if p.name.endswith(".tmp")]

    # a new .proto (even one with an older mtime) makes the set stale
    (proto_dir / "b.proto").write_text(
        'syntax = "proto3";\npackage t;\nimport "a.proto";\nmessage B { A a = 1; }\n'
    )
    os.utime(proto_dir / "b.proto", (1, 1))
    monkeypatch.setattr(protocol, "_pool", None)
    assert message_class("t.B").DESCRIPTOR.fields_by_name["a"].message_type.full_name == "t.A"

    # an edited .proto makes it stale too
    (proto_dir / "a.proto").write_text(
        'syntax = "proto3";\npackage t;\nmessage A { string x = 1; int32 y = 2; }\n'
    )
    future = desc.stat().st_mtime + 10
    os.utime(proto_dir / "a.proto", (future, future))
    monkeypatch.setattr(protocol, "_pool", None)
    assert "y" in message_class("t.A").DESCRIPTOR.fields_by_name


def test_descriptor_set_compiles_to_temp_when_not_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proto_dir = tmp_path / "protos"
    proto_dir.mkdir()
    (proto_dir / "a.proto").write_text('syntax = "proto3";\npackage t;\nmessage A { string x = 1; }\n')
    real_access = os.access
    # (root may write anywhere, so the folder is made unwritable for the loader's check only)
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == proto_dir else real_access(p, mode))
    monkeypatch.setattr(protocol, "PROTO_DIR", proto_dir)
    monkeypatch.setattr(protocol, "_pool", None)
    assert message_class("t.A")(x="hi").x == "hi"
    assert list(proto_dir.iterdir()) == [proto_dir / "a.proto"]


def test_compile_descriptor_set_matches_setup_py(tmp_path: Path) -> None:
    out = tmp_path / "set.desc"
    compile_descriptor_set(out)
    names = {f.name for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}
    assert {p.name for p in protocol.PROTO_DIR.glob("*.proto")} <= names
    setup_py = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert '"--include_imports"' in setup_py and "--descriptor_set_out=" in setup_py

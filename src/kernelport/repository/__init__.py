"""The model repository: Triton's layout and config.pbtxt, parsed, validated and completed."""

from __future__ import annotations

from kernelport.repository.config import (
    CONFIG_FILENAME,
    InstanceGroupSpec,
    ModelSpec,
    TensorSig,
    TensorSpec,
    complete_config,
    model_config_class,
    parse_config,
)
from kernelport.repository.dtypes import (
    DATATYPES,
    config_type_to_datatype,
    config_type_to_numpy,
    datatype_itemsize,
    datatype_to_config_enum,
    datatype_to_config_type,
    datatype_to_numpy,
    numpy_to_datatype,
    ort_type_to_datatype,
)
from kernelport.repository.repository import (
    PLATFORMS,
    ModelEntry,
    load_model,
    load_repository,
    platform_of,
    validate_model_name,
)

__all__ = [
    "CONFIG_FILENAME",
    "DATATYPES",
    "PLATFORMS",
    "InstanceGroupSpec",
    "ModelEntry",
    "ModelSpec",
    "TensorSig",
    "TensorSpec",
    "complete_config",
    "config_type_to_datatype",
    "config_type_to_numpy",
    "datatype_itemsize",
    "datatype_to_config_enum",
    "datatype_to_config_type",
    "datatype_to_numpy",
    "load_model",
    "load_repository",
    "model_config_class",
    "numpy_to_datatype",
    "ort_type_to_datatype",
    "parse_config",
    "platform_of",
    "validate_model_name",
]

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("layer", "hidden", "token_ids")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    token_ids: Tensor
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., token_ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden", "epoch")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    epoch: int
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_type", "config_hash", "moe_layers", "hidden_size", "dtypes", "weight_versions", "max_request_tokens", "epoch")
    class WeightVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    model_type: str
    config_hash: str
    moe_layers: _containers.RepeatedScalarFieldContainer[int]
    hidden_size: int
    dtypes: _containers.RepeatedScalarFieldContainer[str]
    weight_versions: _containers.ScalarMap[str, str]
    max_request_tokens: int
    epoch: int
    def __init__(self, model_type: _Optional[str] = ..., config_hash: _Optional[str] = ..., moe_layers: _Optional[_Iterable[int]] = ..., hidden_size: _Optional[int] = ..., dtypes: _Optional[_Iterable[str]] = ..., weight_versions: _Optional[_Mapping[str, str]] = ..., max_request_tokens: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class ExpertBatch(_message.Message):
    __slots__ = ("layer", "hidden", "experts", "counts", "scale", "epoch", "versions")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    experts: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    scale: Tensor
    epoch: int
    versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., experts: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ..., scale: _Optional[_Union[Tensor, _Mapping]] = ..., epoch: _Optional[int] = ..., versions: _Optional[_Iterable[str]] = ...) -> None: ...

class ExpertResult(_message.Message):
    __slots__ = ("hidden",)
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("payload", "group")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    group: str
    def __init__(self, payload: _Optional[bytes] = ..., group: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: bytes
    def __init__(self, snapshot: _Optional[bytes] = ...) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("token", "layer", "expert", "replicas")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    token: str
    layer: int
    expert: int
    replicas: int
    def __init__(self, token: _Optional[str] = ..., layer: _Optional[int] = ..., expert: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class SwapRequest(_message.Message):
    __slots__ = ("token", "layer", "experts", "source_dir")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DIR_FIELD_NUMBER: _ClassVar[int]
    token: str
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    source_dir: str
    def __init__(self, token: _Optional[str] = ..., layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ..., source_dir: _Optional[str] = ...) -> None: ...

class PlacementRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PlacementReply(_message.Message):
    __slots__ = ("report",)
    REPORT_FIELD_NUMBER: _ClassVar[int]
    report: bytes
    def __init__(self, report: _Optional[bytes] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("token", "dry_run")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    token: str
    dry_run: bool
    def __init__(self, token: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class AutoscaleRequest(_message.Message):
    __slots__ = ("token", "enabled")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    token: str
    enabled: bool
    def __init__(self, token: _Optional[str] = ..., enabled: _Optional[bool] = ...) -> None: ...

class AdminReply(_message.Message):
    __slots__ = ("ok", "message", "epoch", "change_id")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    epoch: int
    change_id: str
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ..., epoch: _Optional[int] = ..., change_id: _Optional[str] = ...) -> None: ...

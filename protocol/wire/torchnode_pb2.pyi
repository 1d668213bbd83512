from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Auth(_message.Message):
    __slots__ = ("public_key", "timestamp", "nonce", "signature", "audience", "in_reply_to")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    IN_REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    timestamp: float
    nonce: bytes
    signature: bytes
    audience: bytes
    in_reply_to: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., timestamp: _Optional[float] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., audience: _Optional[bytes] = ..., in_reply_to: _Optional[bytes] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "revision", "start_block", "end_block", "total_blocks", "hidden_size", "dtype", "throughput", "cache_bytes_free", "sessions_free", "version", "public_key", "max_message_bytes", "auth", "batch_size", "queue_length", "adapters", "protocol", "asyncio_tasks", "quant", "batches_run", "sequences_run")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FREE_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FREE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ASYNCIO_TASKS_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    BATCHES_RUN_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_RUN_FIELD_NUMBER: _ClassVar[int]
    model: str
    revision: str
    start_block: int
    end_block: int
    total_blocks: int
    hidden_size: int
    dtype: str
    throughput: float
    cache_bytes_free: int
    sessions_free: int
    version: str
    public_key: bytes
    max_message_bytes: int
    auth: Auth
    batch_size: int
    queue_length: int
    adapters: _containers.RepeatedScalarFieldContainer[str]
    protocol: str
    asyncio_tasks: int
    quant: str
    batches_run: int
    sequences_run: int
    def __init__(self, model: _Optional[str] = ..., revision: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., total_blocks: _Optional[int] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., throughput: _Optional[float] = ..., cache_bytes_free: _Optional[int] = ..., sessions_free: _Optional[int] = ..., version: _Optional[str] = ..., public_key: _Optional[bytes] = ..., max_message_bytes: _Optional[int] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ..., batch_size: _Optional[int] = ..., queue_length: _Optional[int] = ..., adapters: _Optional[_Iterable[str]] = ..., protocol: _Optional[str] = ..., asyncio_tasks: _Optional[int] = ..., quant: _Optional[str] = ..., batches_run: _Optional[int] = ..., sequences_run: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("hidden", "start_block", "end_block", "wire_dtype", "lora", "lora_scale", "auth")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    LORA_SCALE_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    start_block: int
    end_block: int
    wire_dtype: str
    lora: _containers.RepeatedCompositeFieldContainer[LoraTensor]
    lora_scale: float
    auth: Auth
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., wire_dtype: _Optional[str] = ..., lora: _Optional[_Iterable[_Union[LoraTensor, _Mapping]]] = ..., lora_scale: _Optional[float] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class LoraTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("hidden", "grad_output", "start_block", "end_block", "lora", "lora_scale", "wire_dtype", "auth")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    LORA_SCALE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    grad_output: Tensor
    start_block: int
    end_block: int
    lora: _containers.RepeatedCompositeFieldContainer[LoraTensor]
    lora_scale: float
    wire_dtype: str
    auth: Auth
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., lora: _Optional[_Iterable[_Union[LoraTensor, _Mapping]]] = ..., lora_scale: _Optional[float] = ..., wire_dtype: _Optional[str] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_hidden", "lora_grads", "auth")
    GRAD_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LORA_GRADS_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    grad_hidden: Tensor
    lora_grads: _containers.RepeatedCompositeFieldContainer[LoraTensor]
    auth: Auth
    def __init__(self, grad_hidden: _Optional[_Union[Tensor, _Mapping]] = ..., lora_grads: _Optional[_Iterable[_Union[LoraTensor, _Mapping]]] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden", "auth")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    auth: Auth
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("session_id", "step", "max_length", "start_block", "end_block", "batch_size", "hidden", "position", "wire_dtype", "adapter", "push_to", "push_token", "push_from", "protocol", "auth")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PUSH_TO_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PUSH_FROM_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    max_length: int
    start_block: int
    end_block: int
    batch_size: int
    hidden: Tensor
    position: int
    wire_dtype: str
    adapter: str
    push_to: PushTarget
    push_token: bytes
    push_from: bytes
    protocol: str
    auth: Auth
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., max_length: _Optional[int] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., batch_size: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ..., wire_dtype: _Optional[str] = ..., adapter: _Optional[str] = ..., push_to: _Optional[_Union[PushTarget, _Mapping]] = ..., push_token: _Optional[bytes] = ..., push_from: _Optional[bytes] = ..., protocol: _Optional[str] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class PushTarget(_message.Message):
    __slots__ = ("address", "public_key", "token")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    address: str
    public_key: bytes
    token: bytes
    def __init__(self, address: _Optional[str] = ..., public_key: _Optional[bytes] = ..., token: _Optional[bytes] = ...) -> None: ...

class Pushed(_message.Message):
    __slots__ = ("token", "hidden", "auth")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    hidden: Tensor
    auth: Auth
    def __init__(self, token: _Optional[bytes] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("token", "auth")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    auth: Auth
    def __init__(self, token: _Optional[bytes] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("session_id", "step", "hidden", "cached_length", "push_error", "input_digest", "auth")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CACHED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PUSH_ERROR_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    hidden: Tensor
    cached_length: int
    push_error: str
    input_digest: bytes
    auth: Auth
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., cached_length: _Optional[int] = ..., push_error: _Optional[str] = ..., input_digest: _Optional[bytes] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class StepBatch(_message.Message):
    __slots__ = ("steps", "close", "auth")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    close: _containers.RepeatedScalarFieldContainer[str]
    auth: Auth
    def __init__(self, steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., close: _Optional[_Iterable[str]] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class StepBatchResult(_message.Message):
    __slots__ = ("results", "errors", "auth")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StepResult]
    errors: _containers.RepeatedCompositeFieldContainer[StepError]
    auth: Auth
    def __init__(self, results: _Optional[_Iterable[_Union[StepResult, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[StepError, _Mapping]]] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("session_id", "step", "status", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    status: str
    message: str
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

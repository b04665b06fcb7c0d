"""KServe v2 / Open Inference Protocol (OIP) front of the service: gRPC and HTTP.

Stock clients (``tritonclient.grpc``, ``tritonclient.http``, KServe's ``InferenceServerClient``,
``grpc_health_probe``, ``grpcurl``) talk to the service unchanged::

    client -gRPC :50051-> grpc_server.GrpcFront ─┐
                                                 ├─> protocol.InferenceFront ─> InferencePipeline
    client -HTTP :3000 /v2/...-> http.routes ────┘    (validate tensors,         (decode, Encoder:
                                                        metadata, config,         one adaptive
                                                        classification)           batcher for all)

Modules:
    ``protocol``: protocol-independent core: tensors in, tensors out, metadata, model config,
        classification extension; errors are :class:`models.errors.RequestError` (the one error
        table: gRPC status and HTTP status per code).
    ``tensors``: the wire-independent request and response tensors.
    ``grpc_server``: ``grpc.aio`` server started in every API worker by the BentoML
        ``on_startup`` hook (SO_REUSEPORT: all workers share the port), with
        ``grpc.health.v1`` health checking, server reflection and API-key authentication.
    ``http``: the KServe v2 HTTP/REST paths (``/v2/...``, JSON and Triton's binary tensor
        extension) mounted next to the service's other routes.
    ``proto/``: ``grpc_predict_v2.proto`` and its generated, committed stubs.

Protocol references: the Open Inference Protocol
(https://github.com/kserve/open-inference-protocol, ``specification/protocol/
inference_grpc.md`` and ``inference_rest.md``), KServe's v2 predict API
(https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/), and Triton's
extensions (https://github.com/triton-inference-server/server/tree/main/docs/protocol:
``extension_classification.md``, ``extension_model_configuration.md``,
``extension_binary_data.md``).

Regenerating the stubs (only after editing the ``.proto``; installing never needs it). From the
repository root, with the pinned generator from the ``test`` extra (grpcio-tools 1.81.1 writes
code for protobuf 6.33, which runs on the pinned protobuf < 7 that tritonclient requires)::

    .venv/bin/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \\
        --grpc_python_out=. service/kserve/proto/grpc_predict_v2.proto

``tests/test_grpc.py::test_generated_stubs_match_proto`` fails when the committed stubs and the
``.proto`` disagree.

Caveat: the stubs register messages of ``package inference`` in protobuf's default descriptor
pool, and so does ``tritonclient.grpc`` (a superset, in another file): one Python process
cannot import both. Servers import only these stubs; clients import only tritonclient.
"""

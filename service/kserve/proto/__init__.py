"""Generated gRPC stubs of ``grpc_predict_v2.proto`` (see ``service/kserve/__init__.py``)."""

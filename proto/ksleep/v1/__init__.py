"""ksleep's wire contract, version 1: the .proto files beside this module and the code `make proto` generates
from them (common_pb2, worker_pb2, ksleep_pb2, forkserver_pb2 and their *_grpc modules)."""

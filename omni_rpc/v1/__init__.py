"""Generated protobuf and gRPC code for package omni.v1 (``make proto`` regenerates it)."""

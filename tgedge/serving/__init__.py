"""Serving tgedge exports on Triton Inference Server (docs/SERVING.md).

`repository` writes a Triton model repository from an export or engine directory (one model per stage, plus the
streaming `tgedge` entry model); `server` runs the real `tritonserver` on it; `client` asks it over gRPC streaming;
`loadtest` measures it beside the single-process loop. Only `repository` and `server` are needed to serve; the Triton
Python backend runs `entry` and `stage` inside the server.
"""

"""Checkpoints: reading a model's weights and writing the output's."""
from .writer import (COPIED_FILES, SAFETENSORS_DTYPES, BackgroundWrite, OutputError, RunDirectory, StreamedTensor,
                     write_json, write_safetensors)

__all__ = ["COPIED_FILES", "SAFETENSORS_DTYPES", "BackgroundWrite", "OutputError", "RunDirectory", "StreamedTensor",
           "write_json", "write_safetensors"]

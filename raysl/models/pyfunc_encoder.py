"""The registered encoder as an MLflow pyfunc, logged as code (MLflow's models-from-code), not as a pickle.

`raysl.tracking.register_encoder` passes this file's path as `python_model`: MLflow copies the file into the model
and, on `mlflow.pyfunc.load_model`, runs it — it imports raysl and rebuilds the encoder from the model's
artifacts (safetensors weights + the JSON spec, checked by `raysl.models.spec`). Nothing is unpickled.
Serving: uint8 images (N, 3, H, W) → embeddings (N, D).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.models
import numpy as np
import torch
from mlflow.pyfunc import PythonModel, PythonModelContext


class EncoderModel(PythonModel):  # type: ignore[misc]
    def load_context(self, context: PythonModelContext) -> None:
        from raysl.models.files import load_encoder_dir

        self.model, self.spec = load_encoder_dir(Path(context.artifacts["weights"]).parent)

    # Typed input: without a hint MLflow warns on every log_model; np.ndarray is a hint it accepts without
    # inferring a schema, so the signature still comes from the input example.
    def predict(self, context: PythonModelContext | None, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> np.ndarray:
        from raysl.data.views import normalize

        x = torch.as_tensor(np.asarray(model_input, dtype=np.uint8))
        with torch.no_grad():
            out: np.ndarray = self.model(normalize(x, self.spec["mean"], self.spec["std"])).numpy()
        return out


mlflow.models.set_model(EncoderModel())

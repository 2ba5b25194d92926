"""So-ViT as an MLflow pyfunc, logged as code (MLflow's "models from code"): MLflow copies this file into the logged
model and runs it when the model is loaded, so no pickled module is stored (``mlflow_env.log_best_model`` logs it).

The model's artifact ``export`` is the run's timm local-dir export (config.json + model.safetensors). ``predict``
takes a float32 batch (N, 3, H, W), normalised as the export's ``pretrained_cfg`` says (``timm.data.
resolve_data_config``), and returns the logits (N, num_classes).
"""

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class SoViTClassifier(PythonModel):
    def load_context(self, context) -> None:
        import timm

        import pipeline.models  # noqa: F401  (registers sovit_* with timm; the logged model carries this package)

        self.model = timm.create_model(f"local-dir:{context.artifacts['export']}", pretrained=True).eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(model_input), dtype=torch.float32)).numpy()


mlflow.models.set_model(SoViTClassifier())

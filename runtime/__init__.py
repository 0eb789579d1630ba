"""edgecl.runtime: the on-device side. Imports only numpy and onnxruntime, never torch."""

from .budget import MemoryPlan, parse_bytes, peak_rss_bytes, plan_memory
from .buffer import ReplayBuffer
from .checkpoint import Checkpoint, CheckpointWriter, load_checkpoint, save_checkpoint
from .data import Dataset, load_dataset
from .engine import Batch, Engine
from .errors import (ArtifactError, BatchError, CheckpointFormatError, ConfigMismatchError, EdgeclError, FolderBusyError,
                     UnsupportedModelError)
from .inference_model import export_inference
from .loop import RunConfig, RunResult, run_scenario
from .manifest import Manifest, TensorSpec, load_manifest
from .optim import OptimizerConfig, OptimizerKind
from .online import OnlineLearner, open_learner
from .online_config import OnlineConfig
from .open import open_engine
from .scenarios import Scenario, Task, permuted_scenario, split_scenario
from .strategies import Learner, Method, SparCLConfig, StrategyConfig

__all__ = [
    "ArtifactError", "Batch", "BatchError", "Checkpoint", "CheckpointFormatError", "CheckpointWriter",
    "ConfigMismatchError", "Dataset", "FolderBusyError", "EdgeclError", "Engine", "Learner", "Manifest",
    "MemoryPlan", "Method", "OnlineConfig", "OnlineLearner", "OptimizerConfig", "OptimizerKind", "ReplayBuffer",
    "RunConfig", "RunResult", "Scenario", "SparCLConfig", "StrategyConfig", "Task", "TensorSpec",
    "UnsupportedModelError", "export_inference", "load_checkpoint", "load_dataset", "load_manifest", "open_engine",
    "open_learner", "parse_bytes", "peak_rss_bytes", "permuted_scenario", "plan_memory", "run_scenario",
    "save_checkpoint", "split_scenario",
]

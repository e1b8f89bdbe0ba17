"""`nenni pipeline`: the product's stages (train or import, calibrate, fine-tune, export, check, bench, eval) run
in order from one config file, each as the real `nenni` command, then one report folder over their JSON.

`nenni demo` is this pipeline with the built-in `demo` config (scikit-learn digits, no download).
"""

from .config import PipelineConfig, load_config
from .report import summarise, write_report
from .stages import STAGES, Stage, run_pipeline

__all__ = ["PipelineConfig", "STAGES", "Stage", "load_config", "run_pipeline", "summarise", "write_report"]

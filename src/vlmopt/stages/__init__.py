"""The stages, one module each; `STAGES` lists them in pipeline order (the CLI, recipes and the Python API are made from it).

Adding a stage: write its module (a `Stage` subclass and `STAGE = TheStage()`), and add it here."""

from vlmopt.stages.bench import STAGE as BENCH
from vlmopt.stages.build import STAGE as BUILD
from vlmopt.stages.convert import STAGE as CONVERT
from vlmopt.stages.distill import STAGE as DISTILL
from vlmopt.stages.export import STAGE as EXPORT
from vlmopt.stages.openvino import STAGE as OPENVINO
from vlmopt.stages.optimize import STAGE as OPTIMIZE
from vlmopt.stages.prune import STAGE as PRUNE
from vlmopt.stages.quantize import STAGE as QUANTIZE

STAGES = (EXPORT, PRUNE, DISTILL, CONVERT, OPTIMIZE, QUANTIZE, OPENVINO, BUILD, BENCH)

"""The expert engine: routed experts in host memory, computed on CPU, streamed to the GPU, or resident."""
from kllama.experts.crossover import measure_crossover
from kllama.experts.families import FAMILIES, FamilySpec, family_of, find_expert_modules
from kllama.experts.install import ExpertEngine, install_expert_engine, wire_engine
from kllama.experts.lora import EXPERT_TARGETS, ExpertLoRA, ExpertLoraSet
from kllama.experts.module import HostExperts
from kllama.experts.placement import MODES, TARGETS, ExpertPlacement
from kllama.experts.stream import ExpertStreamer

__all__ = [
    "EXPERT_TARGETS", "FAMILIES", "MODES", "TARGETS", "ExpertEngine", "ExpertLoRA", "ExpertLoraSet",
    "ExpertPlacement", "ExpertStreamer", "FamilySpec", "HostExperts", "family_of", "find_expert_modules",
    "install_expert_engine", "measure_crossover", "wire_engine",
]

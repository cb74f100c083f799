"""Networks used by the demo, the benchmarks and the tests."""
from .cifar_resnet import resnet18, resnet34

__all__ = ["resnet18", "resnet34"]

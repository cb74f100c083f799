"""Networks used by the demo, the benchmarks and the tests."""
from .cifar_resnet import resnet18, resnet34
from .vgg import vgg8_bn, vgg11_bn, vgg13_bn
from .wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = ["resnet18", "resnet34"]
__all__ += ["vgg8_bn", "vgg11_bn", "vgg13_bn", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]

"""What predict's forkserver imports before it forks the host workers: the torch-free host module
and the compiled label-map loop, loaded once there instead of once in every worker."""

from segcli.pipeline import host  # noqa: F401
from segcli.postprocess.kernels import warm_up

warm_up()

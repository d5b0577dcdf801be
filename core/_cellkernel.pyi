import numpy as np
import numpy.typing as npt

def bmp24_field(
    data: bytes,
    offset: int,
    stride: int,
    bottom_up: bool,
    height: int,
    left: int,
    top: int,
    side: int,
    factor: int,
    extent: float,
    size: int,
    out: npt.NDArray[np.uint8],
    /,
) -> None: ...

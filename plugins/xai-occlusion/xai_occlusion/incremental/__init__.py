"""Incremental inference for occlusion on CNNs (exact), with an approximate mode.

An occluded input differs from the original only inside its box. Through a convolution or a
pooling layer the difference spreads only as far as the layer's receptive field reaches; through
an element-wise layer it does not spread at all. So the engine runs the unoccluded forward once,
keeps every layer's activation (the *cache*), and for each window computes only the *patch* of
each layer the box can reach, reading the rest from the cache. The ideas are those of Krypton
(Nakandala, Kumar, Papakonstantinou, SIGMOD 2019); the implementation is ours.

How it works:

* The model is captured with :func:`torch.fx.symbolic_trace` (cached per model). The first
  forward (on the ``N`` unoccluded samples) interprets the graph and stores every node's value.
* A *region* per node says where its patch lies for each window position: one patch size per
  spatial axis (the same for every window, so windows batch) and one start per window and axis,
  found from the layer's kernel, stride, padding and dilation. Regions are computed once per
  call, on the host, from the shapes of the first forward.
* For a chunk of ``B`` perturbations (sample ``rows[b]``, window ``windows[b]``), a node in the
  incremental region holds a ``(B, C, *patch)`` tensor. A convolution or pooling gathers its
  input's receptive field of its output patch from the (padded) cache of the samples in one
  batched index, overlays the input's patch, and runs the layer with no padding on that crop.
  Element-wise layers run on the patch; additions and concatenations first bring their inputs to
  the union of their patches.
* A node the engine cannot run on patches (flatten, linear, global pooling, attention, upsampling,
  any other op), and a patch that covers most of its feature map, ends the incremental region: its
  inputs are *materialised* (cache rows with the patch written in) and it runs normally, batched,
  as does everything after it.
* Exactness: every value outside a patch equals the cached one by construction, so results match
  plain occlusion to float tolerance (a convolution computed on a crop may round differently).

Approximate mode (opt-in) adds two approximations (Krypton's):

* *projective-field thresholding*: a patch never grows beyond ``threshold`` times its feature
  map per axis; it is cut around the centre of the region the box reaches, and the rim is read
  from the cache as if unchanged. Patches stay small down to the global pooling.
* *adaptive refinement*: windows are first evaluated on a coarse grid (every ``coarse``-th
  position per axis), the drops are interpolated (multilinear) onto the full grid, and only the
  share ``refine`` of the remaining windows with the highest interpolated drop are evaluated.

The package, one idea per module: :mod:`.options` (the options, :class:`Unsupported`),
:mod:`.trace` (the fx-trace cache), :mod:`.operators` (which ops run on patches),
:mod:`.regions` (the region algebra), :mod:`.engine` (the engine's state) with
:mod:`.planning`, :mod:`.layers`, :mod:`.folding` (BatchNorm), :mod:`.cost` (the cost model) and
:mod:`.running`, :mod:`.policy` (``prepare``: engine or plain occlusion) and :mod:`.refinement`
(adaptive refinement).
"""

from xai_occlusion.incremental.cost import relative
from xai_occlusion.incremental.engine import Drops, Engine
from xai_occlusion.incremental.options import (
    APPROXIMATION,
    MODES,
    Unsupported,
    approximation_settings,
    incremental_mode,
)
from xai_occlusion.incremental.policy import AUTO_COST, AUTO_MIN_POSITIONS, prepare
from xai_occlusion.incremental.refinement import adaptive_deltas, interpolation
from xai_occlusion.incremental.regions import FULL_AREA, Region, Window
from xai_occlusion.incremental.running import Chunk
from xai_occlusion.incremental.trace import trace

__all__ = [
    "APPROXIMATION",
    "AUTO_COST",
    "AUTO_MIN_POSITIONS",
    "FULL_AREA",
    "MODES",
    "Chunk",
    "Drops",
    "Engine",
    "Region",
    "Unsupported",
    "Window",
    "adaptive_deltas",
    "approximation_settings",
    "incremental_mode",
    "interpolation",
    "prepare",
    "relative",
    "trace",
]

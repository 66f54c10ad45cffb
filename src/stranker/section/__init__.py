"""Where a format becomes a section: the one adapter between the user's objects and stranker.

- :mod:`._record`: the :class:`Section` record (an image handle, spot centres in level-0 pixels,
  the spot diameter, the user's table and its rows) and the element keys it was read from;
- :mod:`._image`: the lazy image handle;
- :mod:`._read`: :func:`as_sections`, the one entry point, dispatching on the format;
- :mod:`.spatialdata`: SpatialData (spatialdata-io's Visium / Visium HD, stranker's readers);
- :mod:`.anndata`: AnnData in squidpy / scanpy layout;
- :mod:`.visium_hd`: the Visium HD bin tables' names and bins summed into pseudo-spots;
- :mod:`.patches`: patch geometry (how wide a model's patch is on a section) and reading.

Nothing else in stranker knows an input format.
"""

from ._image import ImageHandle, ScaledImage
from ._read import as_sections, choose, kind_of
from ._record import ElementKeys, Section

__all__ = ["ElementKeys", "ImageHandle", "ScaledImage", "Section", "as_sections", "choose", "kind_of"]

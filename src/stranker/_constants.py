"""Every key name that stranker reads or writes, in one place."""


class Keys:
    """Names of elements, layers, obsm and uns entries."""

    # elements of the SpatialData objects stranker builds
    IMAGE = "he"
    SHAPES = "spots"
    TABLE = "table"
    REGION = "region"
    INSTANCE = "spot_id"
    # layers
    COUNTS = "counts"
    LOGNORM = "lognorm"
    SMOOTHED = "smoothed"
    # default prefix of model outputs
    PREFIX = "stranker"
    SELECTED = "stranker_selected"
    # squidpy / scanpy layout
    SPATIAL = "spatial"
    MPP = "microns_per_pixel"

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
    # record in an element stranker added to a SpatialData (table uns, shapes / image attrs):
    # {"by": the function, "key": the element's name}; such an element may be replaced by a later call
    WRITTEN = "stranker_element"
    SELECTED = "stranker_selected"
    # squidpy / scanpy layout
    SPATIAL = "spatial"
    MPP = "microns_per_pixel"
    # slide-level tasks (cohort AnnData: one row per slide); suffixes follow the `key_added` prefix
    SLIDE_ID = "slide_id"
    TIME = "time"
    EVENT = "event"
    LABEL = "label"
    TILES = "tiles"  # uns[f"{key_added}_tiles"]: per-slide tile embeddings and centres
    N_TILES = "n_tiles"  # obs[f"{key_added}_n_tiles"]
    SURVIVAL = "survival"  # uns[f"{key_added}_survival"]
    RISK = "risk"  # obs[f"{key_added}_risk"]: out-of-fold risk score
    CLASSIFY = "classify"  # uns[f"{key_added}_classify"]
    PRED = "pred"  # obs[f"{key_added}_pred"]: out-of-fold predicted class
    PROBA = "proba"  # obsm[f"{key_added}_proba"]: out-of-fold class probabilities


# physical spot diameters of the spot-based technologies, in µm (10x Genomics; Ståhl et al. 2016)
SPOT_DIAMETER_UM = {"visium": 55.0, "st": 100.0}

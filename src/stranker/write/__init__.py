"""Where results are written: the only code that touches the user's objects.

Every public call that writes goes through these steps:

- **check** (:mod:`.keys`, :mod:`.elements`): refuse a ``key_added`` or element name that holds
  data stranker did not write, before any work is done;
- **plan** (:mod:`.layers`, :mod:`.tables`): results computed for every section, laid out as they
  will be stored (a dense or sparse prediction layer, full-table arrays);
- **commit** (:func:`write_predictions` and :func:`write_outputs` for a model's outputs,
  :func:`write_results` for any table, :func:`add_elements` for new elements) under
  :func:`unchanged_on_failure` (:mod:`.undo`), so that a failure leaves the user's objects as they were;
- **log**: one line naming the keys added.
"""

from .elements import add_elements, check_free, written_by_stranker
from .keys import check_key_added, is_run_record
from .layers import genes_in_table, modelled_genes, prediction_layer, read_predictions
from .predictions import write_outputs, write_predictions
from .tables import maybe_copy, unique_tables, write_cohort, write_results, write_table
from .undo import snapshot, unchanged_on_failure

__all__ = [
    "add_elements", "check_free", "check_key_added", "genes_in_table", "is_run_record", "maybe_copy",
    "modelled_genes", "prediction_layer", "read_predictions", "snapshot", "unchanged_on_failure",
    "unique_tables", "write_cohort", "write_outputs", "write_predictions", "write_results", "write_table",
    "written_by_stranker",
]

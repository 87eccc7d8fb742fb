"""Data parallelism over a device mesh: meshes, shardings, compiled steps, gradient exchange,
local SGD, and `DataParallel`, the public entry point for any model.

Imports nothing of jaxdp's runtime: only jaxdp.core, jaxdp.errors and HLO byte counting.
"""

from jaxdp.parallel.compile import (
                                    compile_eval_step,
                                    compile_train_step,
                                    pmap_train_step,
                                    replicate,
                                    split_for_pmap,
                                    unreplicate,
)
from jaxdp.parallel.data_parallel import DataParallel, example_weights
from jaxdp.parallel.exchange import CommConfig
from jaxdp.parallel.mesh import (
                                    BATCH_SPEC,
                                    DATA,
                                    MODEL,
                                    REPLICA,
                                    batch_axes,
                                    batch_sharding,
                                    make_mesh,
                                    process_rows,
                                    put_batch,
                                    replicated,
)
from jaxdp.parallel.shardings import (
                                    DEFAULT_RULES,
                                    ZERO_PARTS,
                                    Layout,
                                    check_offload,
                                    gradient_shardings,
                                    path_names,
                                    replicated_report,
                                    state_shardings,
)

__all__ = ["BATCH_SPEC", "CommConfig", "DATA", "DEFAULT_RULES", "DataParallel", "Layout", "MODEL",
           "REPLICA", "ZERO_PARTS", "batch_axes", "batch_sharding", "check_offload", "compile_eval_step",
           "compile_train_step", "example_weights", "gradient_shardings", "make_mesh",
           "path_names", "pmap_train_step", "process_rows", "put_batch", "replicate",
           "replicated", "replicated_report", "split_for_pmap", "state_shardings", "unreplicate"]

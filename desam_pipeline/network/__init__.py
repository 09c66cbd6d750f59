"""The DeSAM network (PRIM on SAM's decoder and the PDMM mask module) and the coupled SAM baseline."""
from desam_pipeline.network.coupled import CoupledSAM
from desam_pipeline.network.desam import DeSAM

__all__ = ["CoupledSAM", "DeSAM"]

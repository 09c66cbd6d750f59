"""desam: DeSAM (decoupled Segment Anything) as a self-configuring pipeline."""

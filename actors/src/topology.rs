//! Topologies defined in code: sources, stages and sinks placed on edge or cloud nodes.

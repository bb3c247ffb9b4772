//! Hot-path stages: event-time windows and detectors, as sans-IO operators.

//! filled in by the Kafka sink work

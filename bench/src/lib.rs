//! Benchmarks for creditgate (see benches/); the load harness joins here later.

//! Test-only faults, named by `PROJECT_INGRESS_PROXY_TEST_FAULT` (read once): the tests
//! use them to make failures happen that the machine would not produce on demand.

use std::sync::OnceLock;

const ENV: &str = "PROJECT_INGRESS_PROXY_TEST_FAULT";

/// Whether the fault `name` was asked for.
pub fn active(name: &str) -> bool {
    static FAULT: OnceLock<Option<String>> = OnceLock::new();
    FAULT.get_or_init(|| std::env::var(ENV).ok()).as_deref() == Some(name)
}

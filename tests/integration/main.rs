//! Integration tests against real QEMU and a real Nomad agent.

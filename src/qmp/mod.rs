//! Async QMP client: line codec, session set-up, command routing and events.

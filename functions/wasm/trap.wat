;; wasm-trap: traps (`unreachable`) on every request: a panic.
(module
  (memory (export "memory") 1)
  (func (export "handle") unreachable))

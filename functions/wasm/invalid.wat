;; wasm-invalid: well-formed text, but not valid WebAssembly (the function
;; returns an i64 where its type says i32): init fails.
(module
  (memory (export "memory") 1)
  (func (export "handle") (result i32) (i64.const 0)))

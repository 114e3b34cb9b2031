;; wasm-fail: refuses every request with a message (`fail`).
(module
  (import "microfaas" "fail" (func $fail (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "wasm-fail: request refused")
  (func (export "handle") (call $fail (i32.const 0) (i32.const 26))))

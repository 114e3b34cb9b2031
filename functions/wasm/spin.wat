;; wasm-spin: never returns: the invocation budget stops it.
(module
  (memory (export "memory") 1)
  (func (export "handle") (loop $forever (br $forever))))

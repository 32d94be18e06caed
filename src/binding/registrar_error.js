// RegistrarError: the class of every error @mcpctl/registrar throws or rejects
// with (index.d.ts `RegistrarErrorCode`). Evaluated once per JavaScript environment by
// error.rs, which exports the class and builds every error with it.
(function defineRegistrarError() {
  'use strict'
  class RegistrarError extends Error {
    constructor(message, options) {
      const { code, status, cause } = options ?? {}
      super(message, cause === undefined ? undefined : { cause })
      this.code = code
      if (status !== undefined) this.status = status
    }
  }
  // On the prototype, like the built-in errors: stacks and util.inspect read it.
  Object.defineProperty(RegistrarError.prototype, 'name', {
    value: 'RegistrarError',
    writable: true,
    configurable: true,
  })
  return RegistrarError
})()

// The JavaScript half of the provider bridge, evaluated once per registrar by
// provider_bridge.rs. It owns what only JavaScript can hold well: each task's
// AbortController, the providers' async iterators, and calls made with the
// right `this`. Rust passes task ids and JSON text; every function here answers
// a JSON text and never throws or rejects, so a broken provider cannot crash
// mcplocal.
;(function createProviderBridge(logger, onStateChange) {
  'use strict'
  const providers = new Map()
  const tasks = new Map()

  const describe = (error) => {
    if (error instanceof Error) return error.message || error.name || 'Error'
    if (typeof error === 'string') return error
    try {
      return JSON.stringify(error) ?? String(error)
    } catch {
      return String(error)
    }
  }
  const failure = (error) => JSON.stringify({ ok: false, message: describe(error) })
  const encode = (value) => {
    try {
      return JSON.stringify({ ok: true, value })
    } catch (error) {
      return failure(new Error(`the provider returned a value that is not JSON: ${describe(error)}`))
    }
  }

  function begin(taskId, optionsJson) {
    const controller = new AbortController()
    const options = JSON.parse(optionsJson)
    options.signal = controller.signal
    const task = { controller, iterator: null }
    tasks.set(taskId, task)
    return { task, options }
  }

  function closeIterator(task) {
    const iterator = task.iterator
    task.iterator = null
    if (iterator && typeof iterator.return === 'function') {
      Promise.resolve()
        .then(() => iterator.return())
        .catch(() => {})
    }
  }

  return {
    publish(name, provider) {
      providers.set(name, provider)
    },

    // mcplocal's registry is a Map or any object with get(name); its errors
    // become a warning, not an exception.
    lookup(registry, name) {
      try {
        return { provider: registry.get(name), error: null }
      } catch (error) {
        return { provider: undefined, error: describe(error) }
      }
    },

    complete(name, taskId, optionsJson) {
      return new Promise((resolve) => {
        const provider = providers.get(name)
        const { options } = begin(taskId, optionsJson)
        resolve(provider.complete(options))
      })
        .then(encode, failure)
        .finally(() => tasks.delete(taskId))
    },

    openStream(name, taskId, optionsJson) {
      return new Promise((resolve) => {
        const provider = providers.get(name)
        const { task, options } = begin(taskId, optionsJson)
        const iterable = provider.stream(options)
        const open = iterable?.[Symbol.asyncIterator]
        if (typeof open !== 'function') {
          throw new Error("the provider's stream() did not return an async iterable")
        }
        task.iterator = open.call(iterable)
        resolve(JSON.stringify({ ok: true }))
      }).catch((error) => {
        tasks.delete(taskId)
        return failure(error)
      })
    },

    next(taskId) {
      const task = tasks.get(taskId)
      if (!task?.iterator) {
        return Promise.resolve(failure(new Error('the stream was closed')))
      }
      return new Promise((resolve) => resolve(task.iterator.next()))
        .then((step) => {
          if (step === null || typeof step !== 'object') {
            throw new Error("the provider's iterator returned a non-object step")
          }
          if (step.done) {
            task.iterator = null
            tasks.delete(taskId)
            return JSON.stringify({ ok: true, done: true })
          }
          return JSON.stringify({ ok: true, value: step.value })
        })
        .catch((error) => {
          // The stream is over: let the provider's iterator clean up (its
          // finally blocks run) and forget the task.
          tasks.delete(taskId)
          closeIterator(task)
          return failure(error)
        })
    },

    abort(taskId, reason, timedOut) {
      const task = tasks.get(taskId)
      if (!task) return
      tasks.delete(taskId)
      try {
        task.controller.abort(new DOMException(reason, timedOut ? 'TimeoutError' : 'AbortError'))
      } catch {
        // A listener threw; the signal has fired all the same.
      }
      closeIterator(task)
    },

    log(level, message, fieldsJson) {
      if (!logger) return
      try {
        const method = typeof logger[level] === 'function' ? level : 'info'
        logger[method](message, JSON.parse(fieldsJson))
      } catch {
        // A broken logger must not take the registrar down.
      }
    },

    stateChange(statusJson) {
      if (!onStateChange) return
      try {
        onStateChange(JSON.parse(statusJson))
      } catch (error) {
        process.emitWarning(`onStateChange threw: ${describe(error)}`, 'RegistrarWarning')
      }
    },

    keepAlive() {},
  }
})

// Test helpers of @mcpctl/registrar: the fake mcpd, for the addon's tests and the dev mcpd command.
'use strict'

module.exports = require('./fake-mcpd')

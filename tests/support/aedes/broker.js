'use strict'
// aedes as a test broker, started by tests/support/aedes.rs.
//
//   node broker.js [--port N] [--ws-port N] [--deny FILTER]... [--username U --password P]
//
// Port 0 (the default) lets the OS pick a free port, so two tests never race for one;
// the chosen ports are printed in one readiness line on stdout:
//
//   aedes ready version=0.51.3 mqtt=127.0.0.1:PORT [ws=127.0.0.1:PORT]
//
// Everything else goes to stderr, which the Rust side keeps as the broker log.
// Sessions live in aedes's in-memory persistence: they survive reconnects, not a
// restart of this process. The process exits when its stdin closes, so a test binary
// that dies without running destructors leaves no broker behind.

const net = require('node:net')
const http = require('node:http')
// aedes 0.51 is CommonJS and runs on Debian 12's Node.js 18; aedes 1.x is an ES
// module that needs Node.js 20.
const createBroker = require('aedes')
const { WebSocketServer, createWebSocketStream } = require('ws')

const HOST = '127.0.0.1'

function parseArgs (argv) {
  const options = { port: 0, wsPort: null, deny: [], username: null, password: null }
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i]
    const value = argv[i + 1]
    if (value === undefined) throw new Error(`${flag} needs a value`)
    i++
    if (flag === '--port') options.port = Number(value)
    else if (flag === '--ws-port') options.wsPort = Number(value)
    else if (flag === '--deny') options.deny.push(value)
    else if (flag === '--username') options.username = value
    else if (flag === '--password') options.password = value
    else throw new Error(`unknown option ${flag}`)
  }
  if ((options.username === null) !== (options.password === null)) {
    throw new Error('--username and --password go together')
  }
  return options
}

function log (line) {
  process.stderr.write(`${new Date().toISOString()} ${line}\n`)
}

function listen (server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, HOST, () => resolve(server.address().port))
  })
}

async function main () {
  const options = parseArgs(process.argv.slice(2))
  const broker = createBroker()

  if (options.username !== null) {
    broker.authenticate = (client, username, password, callback) => {
      const ok = username === options.username &&
        password !== undefined && password !== null &&
        password.toString() === options.password
      if (ok) return callback(null, true)
      // 4 = "bad user name or password" (3.1.1 table 3.1); aedes maps it for MQTT 5.
      const error = new Error('bad user name or password')
      error.returnCode = 4
      callback(error, false)
    }
  }

  // Exact filter strings, not topic matching: a test denies the filter it subscribes
  // with, so the SUBACK carries 0x80 for that entry and the grant for the others.
  const denied = new Set(options.deny)
  broker.authorizeSubscribe = (client, subscription, callback) => {
    if (denied.has(subscription.topic)) {
      log(`refused subscription ${client ? client.id : '-'} ${subscription.topic}`)
      return callback(null, null)
    }
    callback(null, subscription)
  }

  broker.on('client', (client) => log(`connected ${client.id}`))
  broker.on('clientDisconnect', (client) => log(`disconnected ${client.id}`))
  broker.on('clientError', (client, err) => log(`client error ${client.id}: ${err.message}`))
  broker.on('connectionError', (client, err) => log(`connection error ${client.id}: ${err.message}`))
  broker.on('subscribe', (subs, client) =>
    log(`subscribed ${client.id} ${subs.map((s) => `${s.topic}@${s.qos}`).join(' ')}`))

  const mqttPort = await listen(net.createServer(broker.handle), options.port)
  let ready = `aedes ready version=${require('aedes/package.json').version} mqtt=${HOST}:${mqttPort}`

  if (options.wsPort !== null) {
    const httpServer = http.createServer()
    const wss = new WebSocketServer({ server: httpServer })
    wss.on('connection', (socket, request) => {
      broker.handle(createWebSocketStream(socket), request)
    })
    const wsPort = await listen(httpServer, options.wsPort)
    ready += ` ws=${HOST}:${wsPort}`
  }

  process.stdin.on('end', () => process.exit(0))
  process.stdin.on('error', () => process.exit(0))
  process.stdin.resume()
  process.stdout.write(`${ready}\n`)
  log(ready)
}

main().catch((err) => {
  log(`failed: ${err.stack || err}`)
  process.exit(1)
})

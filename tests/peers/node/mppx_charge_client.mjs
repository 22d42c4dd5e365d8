// Peer: mppx's HTTP client pays a URL with MPP evm/charge, knowing only a real network's USDC.
//
//   PEER_PRIVATE_KEY=0x... node tests/peers/node/mppx_charge_client.mjs URL ASSET
//
// ASSET names one of mppx's own known assets (`base`, `baseSepolia`: `assets.<ASSET>.USDC`, with that
// network's address and EIP-712 domain). No address, chain id or token domain is passed in: the client
// accepts only that token on that network and refuses any other currency before signing anything.
// `Mppx.create` wraps fetch: on a 402 it reads the `WWW-Authenticate: Payment` challenges, signs an EIP-3009
// `authorization` credential and retries once.
// Output (last line, JSON): {"status", "body", "receipt"} or {"error"}.
import { Mppx } from 'mppx/client'
import { assets, evm } from 'mppx/evm/client'
import { privateKeyToAccount } from 'viem/accounts'

const [url, assetName] = process.argv.slice(2)
const known = assets[assetName]?.USDC
if (!known) throw new Error(`mppx knows no USDC on ${assetName}`)
const account = privateKeyToAccount(process.env.PEER_PRIVATE_KEY)
const mppx = Mppx.create({
  methods: [evm.charge({ account, currencies: [known], maxAtomicAmount: '10000' })],
  polyfill: false,
})
let out
try {
  const response = await mppx.fetch(url)
  out = {
    status: response.status,
    body: await response.text(),
    receipt: response.headers.get('payment-receipt'),
  }
} catch (error) {
  out = { error: String(error?.message ?? error) }
}
process.stdout.write('\n' + JSON.stringify(out) + '\n')

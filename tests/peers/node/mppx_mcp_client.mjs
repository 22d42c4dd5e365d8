// Peer: mppx's MCP client (mppx/mcp/client on @modelcontextprotocol/sdk) pays a paid tool with MPP evm/charge.
//
//   PEER_PRIVATE_KEY=0x... node tests/peers/node/mppx_mcp_client.mjs URL TOOL ARGS_JSON CHAIN_ID \
//       TOKEN_NAME TOKEN_VERSION
//
// `McpClient.wrap` makes the SDK client's callTool pay: it reads the MPP challenges from a -32042 error or
// from a tool result's `_meta["org.paymentauth/payment-required"]`, signs an EIP-3009 `authorization`
// credential with `evm.charge`, and retries once with `_meta["org.paymentauth/credential"]`.
// Output (last line, JSON): {"isError", "text", "receipt"}.
import { Client } from '@modelcontextprotocol/sdk/client/index.js'
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js'
import { evm } from 'mppx/evm/client'
import { McpClient } from 'mppx/mcp/client'
import { privateKeyToAccount } from 'viem/accounts'

const [url, tool, argsJson, chainIdText, tokenName, tokenVersion] = process.argv.slice(2)
const chainId = Number(chainIdText)
const account = privateKeyToAccount(process.env.PEER_PRIVATE_KEY)

const client = new Client({ name: 'mppx-peer', version: '1.0.0' })
await client.connect(new StreamableHTTPClientTransport(new URL(url)))
McpClient.wrap(client, {
  methods: [
    evm.charge({
      account,
      authorization: { name: tokenName, version: tokenVersion }, // the token's EIP-3009 domain
      networks: [chainId],
      maxAtomicAmount: '10000',
    }),
  ],
})
const result = await client.callTool({ name: tool, arguments: JSON.parse(argsJson) })
await client.close()
const first = result.content?.[0]
process.stdout.write(
  '\n' + JSON.stringify({ isError: result.isError ?? false, text: first?.text ?? null, receipt: result.receipt ?? null }) + '\n',
)

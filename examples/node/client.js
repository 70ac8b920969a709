// A Node.js client of omni-rpc: streams one generation, then prints the cluster stats.
//
//   npm install
//   node client.js 127.0.0.1:50051 "The capital of France is" 16
//
// The client is built at run time from ../../protos with @grpc/proto-loader: no generated
// code, the same .proto files every language uses.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");

function loadOmni() {
  const definition = protoLoader.loadSync("omni/v1/coordinator.proto", {
    includeDirs: [PROTOS],
    keepCase: true, // the proto's own field names: token_ids, finish_reason
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).omni.v1;
}

function generate(client, prompt, maxTokens) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 60_000);
    const call = client.Generate({ prompt, sampling: { max_tokens: maxTokens } }, { deadline });
    let last = null;
    call.on("data", (response) => {
      process.stdout.write(response.text);
      last = response;
    });
    call.on("error", reject);
    call.on("end", () => resolve(last));
  });
}

function getStats(client) {
  return new Promise((resolve, reject) => {
    client.GetStats({}, { deadline: new Date(Date.now() + 10_000) }, (err, stats) =>
      err ? reject(err) : resolve(stats),
    );
  });
}

async function main() {
  const [address = "127.0.0.1:50051", prompt = "Hello", maxTokens = "16"] = process.argv.slice(2);
  const omni = loadOmni();
  const client = new omni.Coordinator(address, grpc.credentials.createInsecure());
  const last = await generate(client, prompt, Number(maxTokens));
  process.stdout.write("\n");
  console.log(
    `finish_reason=${last.finish_reason} node_id=${last.node_id} attempt=${last.attempt} ` +
      `completion_tokens=${last.usage.completion_tokens}`,
  );
  const stats = await getStats(client);
  console.log(
    `stats: num_nodes=${stats.num_nodes} healthy_nodes=${stats.healthy_nodes.join(",")} ` +
      `requests_total=${stats.requests_total}`,
  );
  client.close();
}

main().catch((err) => {
  console.error(`error: ${err.code !== undefined ? grpc.status[err.code] : ""} ${err.details || err.message}`);
  process.exit(1);
});

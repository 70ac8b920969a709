// A Node.js client of omni-rpc: streams one generation, then prints the cluster stats.
//
//   npm install
//   node client.js 127.0.0.1:50051 "The capital of France is" 16
//
// The address is one coordinator (HOST:PORT), several (a comma-separated list of IP:PORT,
// e.g. 10.0.0.1:50051,10.0.0.2:50051), or a name that resolves to all of them
// (dns:///omni-coordinator-peers.omni-rpc.svc.cluster.local:50051). Calls are spread over the
// coordinators with gRPC's round_robin, which skips the ones that do not answer. When a
// coordinator dies mid-stream (UNAVAILABLE without the omni-final trailer), the request is
// sent again, same request_id, with `resume` = what was received: another coordinator sends
// only what comes next, so every token is printed exactly once.
//
// The client is built at run time from ../../protos with @grpc/proto-loader: no generated
// code, the same .proto files every language uses.
"use strict";

const crypto = require("crypto");
const net = require("net");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");

// Spread calls over every address the target resolves to (gRPC's default, pick_first, would
// send them all to one coordinator).
const SERVICE_CONFIG = JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] });
// Trailing metadata the coordinator sets on an error that is its final answer (never retried).
const FINAL_ERROR_METADATA = "omni-final";
// Continuing a stream whose coordinator died: at most this many times, after a short backoff.
const MAX_RESUMES = 3;
const RESUME_BACKOFF_MS = 200;
const GENERATE_TIMEOUT_MS = 60_000;

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

// The gRPC target for the address argument: HOST:PORT and scheme targets (dns:///name:port,
// ipv4:..., ipv6:..., unix:...) as given; a comma-separated list of IP:PORT as an ipv4: or
// ipv6: target (gRPC resolves a list only of IP literals, all of one family).
function channelTarget(address) {
  if (!address.includes(",") || /^(dns|ipv4|ipv6|unix|unix-abstract):/.test(address)) {
    return address;
  }
  const entries = address.split(",").map((entry) => entry.trim());
  const families = new Set();
  for (const entry of entries) {
    const match = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d+)$/.exec(entry);
    const host = match && (match[1] || match[2]);
    const family = host ? net.isIP(host) : 0;
    if (family === 0) {
      throw new Error(
        `cannot balance over "${address}": a list of coordinators must be IP:PORT ` +
          `entries ([IPv6]:PORT for IPv6), and "${entry}" is not one. For host names, use a ` +
          `DNS name that resolves to every coordinator: dns:///NAME:PORT`,
      );
    }
    families.add(family);
  }
  if (families.size > 1) {
    throw new Error(
      `cannot balance over "${address}": the list mixes IPv4 and IPv6 addresses; use one ` +
        `family, or a DNS name that resolves to every coordinator: dns:///NAME:PORT`,
    );
  }
  return `${families.has(6) ? "ipv6" : "ipv4"}:${entries.join(",")}`;
}

// One Generate call: resolves with the last response, or rejects with the call's error. Every
// response is printed and recorded in `received` as it arrives.
function generateOnce(client, request, deadline, received) {
  return new Promise((resolve, reject) => {
    const call = client.Generate(request, { deadline });
    let last = null;
    call.on("data", (response) => {
      process.stdout.write(response.text);
      received.token_ids.push(...response.token_ids);
      received.text += response.text;
      for (const media of response.outputs) {
        if (media.last_chunk) {
          received.media_items_delivered += 1;
        }
      }
      last = response;
    });
    // An error after the message with the finish_reason: the output is whole (the
    // coordinator went away before its status); nothing to continue.
    call.on("error", (err) => (last && last.finish_reason ? resolve(last) : reject(err)));
    call.on("end", () => resolve(last));
  });
}

// A failure a new attempt may get past: the coordinator (or the connection to it) went away:
// UNAVAILABLE, or CANCELLED (a server shutting down as the call arrived; this client never
// cancels its own calls). Errors the coordinator itself decided carry the omni-final trailer
// and are never retried.
function retriable(err) {
  if (err.code !== grpc.status.UNAVAILABLE && err.code !== grpc.status.CANCELLED) {
    return false;
  }
  return !(err.metadata && err.metadata.get(FINAL_ERROR_METADATA).length > 0);
}

async function generate(client, prompt, maxTokens) {
  const deadline = new Date(Date.now() + GENERATE_TIMEOUT_MS);
  const request = {
    request_id: crypto.randomUUID().replace(/-/g, ""), // the same on every continuation
    prompt,
    sampling: { max_tokens: maxTokens },
  };
  const received = { token_ids: [], text: "", media_items_delivered: 0 };
  for (let resumes = 0; ; resumes++) {
    try {
      return await generateOnce(client, request, deadline, received);
    } catch (err) {
      if (resumes >= MAX_RESUMES || !retriable(err)) {
        throw err;
      }
      // Whatever was received stays received: the next coordinator continues after it.
      if (received.token_ids.length > 0 || received.media_items_delivered > 0) {
        request.resume = {
          token_ids: [...received.token_ids],
          text: received.text,
          media_items_delivered: received.media_items_delivered,
        };
      }
      await new Promise((wake) => setTimeout(wake, RESUME_BACKOFF_MS * 2 ** resumes));
    }
  }
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
  const client = new omni.Coordinator(channelTarget(address), grpc.credentials.createInsecure(), {
    "grpc.service_config": SERVICE_CONFIG,
  });
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

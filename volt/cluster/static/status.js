// The live status page: polls GET /v1/status with the admin token in X-Auth-Token and
// draws each image's tree as SVG. The token lives only in this script's memory: never in a
// URL, a cookie or web storage (a reload signs out). Text reaches the DOM only as
// textContent, never as markup.
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
const DX = 74, DY = 64, MARGIN = 30, R = 9;
let token = null;
let timer = null;
let polls = 0;

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG_NS, tag.slice(4))
    : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    node.setAttribute(key, String(value));
  }
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function signOut(message) {
  token = null;
  clearTimeout(timer);
  document.getElementById("status").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("state").textContent = "signed out";
}

async function poll() {
  if (token === null) return;
  let answer;
  try {
    answer = await fetch("/v1/status", {
      headers: { "X-Auth-Token": token },
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
  } catch (err) {
    document.getElementById("state").textContent = "volt-api unreachable; retrying";
    timer = setTimeout(poll, POLL_MS);
    return;
  }
  if (answer.status === 401 || answer.status === 403) {
    signOut(answer.status === 401 ? "wrong token" : "this token is not the admin token");
    return;
  }
  if (answer.ok) {
    render(await answer.json());
  } else {
    document.getElementById("state").textContent = "volt-api answered " + answer.status;
  }
  timer = setTimeout(poll, POLL_MS);
}

// Tidy layout: leaves take consecutive columns, a parent sits over its children.
function layout(image) {
  const kids = new Map([[null, []]]);
  for (const n of image.nodes) kids.set(n.peer_id, []);
  for (const n of image.nodes) (kids.get(n.parent) || kids.get(null)).push(n.peer_id);
  const pos = new Map();
  let column = 0;
  const place = (id, depth) => {
    const mine = kids.get(id);
    for (const child of mine) place(child, depth + 1);
    const x = mine.length
      ? (pos.get(mine[0]).x + pos.get(mine[mine.length - 1]).x) / 2
      : column++;
    pos.set(id, { x: x, depth: depth });
  };
  place(null, 0);
  return { pos: pos, columns: Math.max(column, 1) };
}

function human(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes, i = 0;
  while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
  return (i ? value.toFixed(1) : String(value)) + " " + units[i];
}

function drawTree(image) {
  const { pos, columns } = layout(image);
  const depth = image.nodes.reduce((d, n) => Math.max(d, pos.get(n.peer_id).depth), 0);
  const xy = (id) => [MARGIN + pos.get(id).x * DX, MARGIN + pos.get(id).depth * DY];
  const svg = el("svg:svg", {
    class: "tree", "data-image": image.id,
    width: 2 * MARGIN + (columns - 1) * DX, height: 2 * MARGIN + depth * DY + 14,
  });
  const edges = el("svg:g", { class: "edges" });
  const nodes = el("svg:g", { class: "nodes" });
  svg.append(edges, nodes);
  const labels = el("svg:g", { class: "edge-labels" });
  for (const n of image.nodes) {
    const [x2, y2] = xy(n.peer_id);
    const [x1, y1] = xy(pos.has(n.parent) ? n.parent : null);
    edges.append(el("svg:line", {
      class: "edge tree-edge", "data-parent": n.parent || "", "data-child": n.peer_id,
      x1: x1, y1: y1, x2: x2, y2: y2,
    }));
    for (const p of n.parents) {
      if (p === n.parent || !pos.has(p)) continue;
      const [sx, sy] = xy(p);
      edges.append(el("svg:line", {
        class: "edge standby", "data-parent": p || "", "data-child": n.peer_id,
        x1: sx, y1: sy, x2: x2, y2: y2,
      }));
    }
    // Bytes this node read from each source it reported: on the edge from that source
    // (near the child, clear of the source's name), or, with no edge drawn from it (a
    // source that is no parent now), under the node's name.
    let below = 0;
    for (const r of n.bytes_read || []) {
      const attrs = {
        class: "edge-bytes", "data-source": r.source || "", "data-child": n.peer_id,
        "data-bytes": r.bytes,
      };
      const onEdge = pos.has(r.source) && (r.source === n.parent || n.parents.includes(r.source));
      if (onEdge) {
        const [sx, sy] = xy(r.source);
        attrs.x = sx + 0.65 * (x2 - sx);
        attrs.y = sy + 0.65 * (y2 - sy);
      } else {
        below += 1;
        attrs.x = x2;
        attrs.y = y2 + R + 12 + 10 * below;
        attrs.class += " off-edge";
      }
      const label = el("svg:text", attrs, (onEdge ? "" : "+") + human(r.bytes));
      label.append(el("svg:title", {}, "read from " + (r.source || "the image server")));
      labels.append(label);
    }
  }
  svg.append(labels);
  const offEdge = [...labels.querySelectorAll("text.off-edge")].map((t) => Number(t.getAttribute("y")));
  svg.setAttribute("height", String(Math.max(Number(svg.getAttribute("height")),
    ...offEdge.map((y) => y + 6))));
  const root = el("svg:g", { class: "node root", "data-peer": "" });
  const [rx, ry] = xy(null);
  root.append(el("svg:circle", { cx: rx, cy: ry, r: R + 2 }),
    el("svg:text", { x: rx, y: ry - R - 5 }, "image server"));
  nodes.append(root);
  for (const n of image.nodes) {
    const [x, y] = xy(n.peer_id);
    const g = el("svg:g", {
      class: "node peer " + n.status, "data-peer": n.peer_id, "data-parent": n.parent || "",
      "data-depth": n.depth, "data-status": n.status,
    });
    g.append(el("svg:title", {}, n.peer_id + " (" + n.status + ", depth " + n.depth +
      ", parents: " + n.parents.map((p) => p || "image server").join(", ") + "; read: " +
      (n.bytes_read ? n.bytes_read.map((r) => (r.source || "image server") + " " +
        human(r.bytes)).join(", ") : "not reported") +
      "; served to other nodes: " + human(n.bytes_served) + ")"));
    g.append(el("svg:circle", { cx: x, cy: y, r: R }));
    g.append(el("svg:text", { x: x, y: y + R + 12 }, n.host || n.member || "?"));
    nodes.append(g);
  }
  return svg;
}

function cell(row, text) {
  row.append(el("td", {}, text === null || text === undefined ? "-" : text));
}

function ratio(used, capacity, key) {
  if (!used) return null;
  return used[key] + " / " + (capacity ? capacity[key] : "?");
}

function render(data) {
  polls += 1;
  const images = document.getElementById("images");
  const blocks = [];
  for (const image of data.images) {
    const block = el("div", { class: "image", "data-image": image.id });
    block.append(el("h3", {}, image.id + ": " + image.count + " nodes, depth " + image.depth +
      (image.truncated ? " (first " + image.nodes.length + " drawn)" : "")));
    const b = image.bytes_read;
    block.append(el("p", {
      class: "bytes", "data-image-server": b.image_server, "data-peers": b.peers,
      "data-reporting": b.nodes_reporting,
    }, "read by the nodes: " + human(b.image_server) + " from the image server, " +
      human(b.peers) + " from peers (" + b.nodes_reporting + " of " + image.count +
      " nodes reporting)"));
    block.append(drawTree(image));
    blocks.push(block);
  }
  if (!blocks.length) blocks.push(el("p", {}, "no image has a tree"));
  if (data.images_hidden) blocks.push(el("p", {}, data.images_hidden + " more images"));
  blocks.push(el("p", { class: "note" }, "green: OK (serving its relay), amber: pending, " +
    "red: any other status; solid: tree parent, dashed: the other parents a node reads from"));
  blocks.push(el("p", { class: "note" }, "edge labels: bytes the lower node read from that " +
    "source, as its last heartbeat reported (a path's counter restarts when it reconnects); " +
    "+N under a node: read from a source that is not its parent now (hover for which)"));
  images.replaceChildren(...blocks);

  const nodeRows = data.nodes.map((n) => {
    const row = el("tr", { "data-node": n.id });
    cell(row, n.id);
    cell(row, n.host);
    cell(row, n.status);
    cell(row, ratio(n.used, n.capacity, "vcpus"));
    cell(row, ratio(n.used, n.capacity, "memory_mb"));
    cell(row, n.vms.map((vm) => vm.name + " " + vm.status +
      (vm.migrating_to ? " (migrating to " + vm.migrating_to + ")" : "")).join(", "));
    cell(row, n.cache.join(", "));
    cell(row, n.heartbeat_age_s);
    return row;
  });
  document.querySelector("#nodes tbody").replaceChildren(...nodeRows);

  const taskRows = data.tasks.map((t) => {
    const row = el("tr", { "data-task": t.task, "data-status": t.status });
    cell(row, t.task);
    cell(row, t.created_at ? new Date(t.created_at * 1000).toISOString() : null);
    cell(row, t.status);
    cell(row, Object.entries(t.counts).map(([s, c]) => s + " " + c).join(", "));
    return row;
  });
  document.querySelector("#tasks tbody").replaceChildren(...taskRows);

  const moveRows = (data.migrations || []).map((m) => {
    const row = el("tr", { "data-vm": m.userid, "data-state": m.state });
    cell(row, m.vm + " (" + m.userid + ")");
    cell(row, m.from);
    cell(row, m.to);
    cell(row, m.state);
    cell(row, m.disk_bytes === null || m.disk_bytes === undefined ? null : human(m.disk_bytes));
    cell(row, m.memory_bytes === null || m.memory_bytes === undefined ? null :
      human(m.memory_bytes));
    cell(row, m.seconds);
    cell(row, m.error);
    return row;
  });
  document.querySelector("#migrations tbody").replaceChildren(...moveRows);

  document.body.dataset.polls = String(polls);
  document.getElementById("state").textContent = "updated " +
    new Date(data.generated_at * 1000).toISOString() + " (every " + POLL_MS / 1000 + " s)";
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token");
    token = input.value;
    input.value = "";
    document.getElementById("login").hidden = true;
    document.getElementById("status").hidden = false;
    document.getElementById("state").textContent = "loading";
    poll();
  });
});

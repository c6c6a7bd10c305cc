/* lensattr report: renders head cards and tables on demand from the JSON data block.
   Every string from the data goes through textContent / setAttribute, never as markup. */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("lensattr-data").textContent);

  function el(tag, attrs) {
    var e = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) {
      var v = attrs[k];
      if (v === null || v === undefined) return;
      if (k === "class") e.className = v;
      else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    });
    for (var i = 2; i < arguments.length; i++) add(e, arguments[i]);
    return e;
  }
  function add(e, c) {
    if (c === null || c === undefined) return;
    if (Array.isArray(c)) { c.forEach(function (x) { add(e, x); }); return; }
    e.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  }
  function num(v) {
    if (v === "inf") return Infinity;
    if (v === "-inf") return -Infinity;
    return typeof v === "number" ? v : NaN;
  }
  function fmt(v) {
    if (v === null || v === undefined || v === "") return "\u2013";
    if (v === "inf") return "\u221e";
    if (v === "-inf") return "\u2212\u221e";
    if (typeof v === "boolean") return v ? "yes" : "no";
    if (typeof v === "number") {
      if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
      var a = Math.abs(v);
      if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
      return v.toFixed(3);
    }
    return String(v);
  }
  function fmtCI(c) {
    if (!Array.isArray(c)) return fmt(c);
    if ((c[1] === null || c[1] === undefined) && (c[2] === null || c[2] === undefined))
      return fmt(c[0]);
    return fmt(c[0]) + " [" + fmt(c[1]) + ", " + fmt(c[2]) + "]";
  }
  function colour(verdict) { return D.colours[verdict] || "#ffffff"; }
  function pill(verdict) {
    return el("span", {"class": "pill", style: "background:" + colour(verdict)}, verdict || "\u2013");
  }

  /* ---- head cards ------------------------------------------------------------------- */
  var byId = {};
  D.cards.forEach(function (c, i) { byId[c.id] = i; });
  var viewSerial = 0;

  function drawPattern(host, ci, vi) {
    host.textContent = "";
    var view = D.views[vi], att = D.patterns[vi][ci];
    if (!att) { add(host, el("p", {"class": "muted"}, "No attention pattern recorded.")); return; }
    if (!window.CircuitsVis) {
      add(host, el("p", {"class": "muted"}, "circuitsvis did not load; the pattern is in the data."));
      return;
    }
    var id = "lensattr-view-" + (++viewSerial);
    add(host, el("div", {id: id}));
    var attention = att.map(function (row) {  // stored in permille
      return row.map(function (v) { return v / 1000; });
    });
    window.CircuitsVis.render(id, window.CircuitsVis.AttentionPattern,
      {tokens: view.tokens, attention: attention, maskUpperTri: view.causal});
  }

  function evidenceTable(rows) {
    return el("table", null, rows.map(function (r) {
      return el("tr", null, el("th", null, r[0]), el("td", {"class": "num"}, fmtCI(r[1])));
    }));
  }

  function edgeBars(edges) {
    var span = 0, hasNorm = false, hasPattern = false;
    edges.forEach(function (e) {
      [e.effect, e.lo, e.hi].forEach(function (v) {
        var x = Math.abs(num(v)); if (isFinite(x)) span = Math.max(span, x);
      });
      if (isFinite(num(e.norm))) hasNorm = true;
      if (e.pattern && isFinite(num(e.pattern[0]))) hasPattern = true;
    });
    span = span || 1;
    function pct(v) { return Math.max(0, Math.min(100, 50 + 50 * v / span)); }
    function share(v, cls, tip) {
      var x = num(v), w = isFinite(x) ? Math.max(0, Math.min(1, x)) * 100 : 0;
      return el("td", null, el("div", {"class": "bar", title: tip + ": " + fmt(v)},
        el("div", {"class": "fill", style: "left:0;width:" + w.toFixed(1) + "%;background:" + cls})));
    }
    var head = el("tr", null, el("th", null, "row"), el("th", null, "source"),
      el("th", null, "attention"), hasNorm ? el("th", null, "norm-based") : null,
      el("th", null, "effect of removing the edge (CI)"), el("th", null, ""),
      hasPattern ? el("th", {title: "only the edge's attention weight replaced by the " +
        "baseline's, values kept (pattern patching)"}, "weight only (CI)") : null);
    var body = edges.map(function (e) {
      var x = num(e.effect), lo = num(e.lo), hi = num(e.hi);
      var bar = el("div", {"class": "bar", title: "effect " + fmtCI([e.effect, e.lo, e.hi])},
        el("div", {"class": "zero", style: "left:50%"}));
      if (isFinite(x)) {
        var a = pct(Math.min(0, x)), b = pct(Math.max(0, x));
        add(bar, el("div", {"class": "fill", style: "left:" + a.toFixed(1) + "%;width:" +
          (b - a).toFixed(1) + "%;background:" + (x >= 0 ? "#c0392b" : "#2e86c1")}));
      }
      if (isFinite(lo) || isFinite(hi)) {
        var l = pct(isFinite(lo) ? lo : -span), h = pct(isFinite(hi) ? hi : span);
        add(bar, el("div", {"class": "ci", style: "left:" + l.toFixed(1) + "%;width:" +
          Math.max(0.5, h - l).toFixed(1) + "%"}));
      }
      var label = e.source + (e.token !== null && e.token !== undefined ? " \u201c" + e.token + "\u201d" : "");
      return el("tr", null, el("td", null, e.query), el("td", null, label + (e.sink ? " (sink)" : "")),
        share(e.attention, "#4a78c2", "attention"), hasNorm ? share(e.norm, "#8e5bb5", "norm-based") : null,
        el("td", null, bar), el("td", {"class": "num"}, fmtCI([e.effect, e.lo, e.hi])),
        hasPattern ? el("td", {"class": "num"}, fmtCI(e.pattern || [null, null, null])) : null);
    });
    return el("table", {"class": "bars"}, head, body);
  }

  function showCard(ci, scroll) {
    var c = D.cards[ci], host = document.getElementById("card");
    if (!c || !host) return;
    host.textContent = "";
    document.querySelectorAll("table.grid td.sel").forEach(function (t) { t.classList.remove("sel"); });
    var cell = document.getElementById("cell-" + c.id);
    if (cell) cell.classList.add("sel");
    var viewHost = el("div", {"class": "view"});
    var picker = el("select", {"aria-label": "prompt", onchange: function () {
      drawPattern(viewHost, ci, Number(picker.value));
    }});
    D.views.forEach(function (v, vi) {
      if (D.patterns[vi][ci]) add(picker, el("option", {value: String(vi)}, v.name));
    });
    var right = el("div", null,
      el("h4", null, "Effect of ablating the head, by baseline"),
      el("table", null, el("tr", null, D.baseline_columns.map(function (h) { return el("th", null, h); })),
        c.baselines.map(function (r) {
          return el("tr", r[0] === c.primary ? {style: "font-weight:600"} : null,
            r.map(function (v, j) { return el("td", j ? {"class": "num"} : null, j ? fmtCI(v) : v); }));
        })),
      c.groups.map(function (g) { return [el("h4", null, g.title), evidenceTable(g.rows)]; }),
      c.edges.length ? [el("h4", null, "Single edges: attention each source receives vs the effect of " +
        "removing it (" + c.primary + ")"), edgeBars(c.edges)] : null);
    add(host, el("div", {"class": "card"},
      el("h3", null, c.id + " ", pill(c.verdict), " ", el("span", {"class": "muted"}, c.subtitle)),
      el("p", {"class": "sentence"}, c.sentence),
      el("div", null, el("div", {"class": "muted"}, "Attention pattern on ", picker), viewHost,
        c.facts.length ? evidenceTable(c.facts) : null),
      right));
    if (picker.options.length) drawPattern(viewHost, ci, Number(picker.value));
    else add(viewHost, el("p", {"class": "muted"}, "No attention pattern recorded."));
    if (scroll) host.scrollIntoView({block: "start"});
  }

  function route(scroll) {
    var id = decodeURIComponent(location.hash.slice(1));
    if (Object.prototype.hasOwnProperty.call(byId, id)) showCard(byId[id], scroll);
    else if (!scroll && D.cards.length) showCard(D.default_card, false);
  }
  window.addEventListener("hashchange", function () { route(true); });

  /* ---- sortable, filterable tables -------------------------------------------------- */
  function makeTable(spec, hostId, limit) {
    var host = document.getElementById(hostId);
    if (!host || !spec) return;
    var state = {col: -1, dir: 1, text: "", verdict: ""};
    var vcol = spec.columns.indexOf("verdict");
    var texts = spec.rows.map(function (r) { return r.map(fmtCI).join(" \u0001 ").toLowerCase(); });
    var input = el("input", {type: "search", placeholder: "filter rows\u2026", "aria-label": "filter"});
    var select = null;
    if (vcol >= 0) {
      select = el("select", {"aria-label": "verdict"}, el("option", {value: ""}, "all verdicts"));
      var seen = {};
      spec.rows.forEach(function (r) { seen[r[vcol]] = true; });
      Object.keys(seen).sort().forEach(function (v) { add(select, el("option", {value: v}, v)); });
    }
    var count = el("span", {"class": "muted"});
    var wrap = el("div", {"class": "tablewrap"});
    add(host, [el("div", {"class": "tablebar"}, input, select, count), wrap]);
    function key(v) {
      if (Array.isArray(v)) v = v[0];
      if (typeof v === "string") {
        var m = /^L(\d+)H(\d+)$/.exec(v);
        if (m) return Number(m[1]) * 100000 + Number(m[2]);
        if (v === "inf" || v === "-inf") return num(v);
      }
      return v;
    }
    function cmp(a, b) {
      var x = key(a), y = key(b);
      var bx = x === null || x === undefined || (typeof x === "number" && isNaN(x));
      var by = y === null || y === undefined || (typeof y === "number" && isNaN(y));
      if (bx || by) return bx === by ? 0 : (bx ? 1 : -1) * state.dir;  // missing last
      if (typeof x === "number" && typeof y === "number") return x - y;
      return String(x).localeCompare(String(y));
    }
    function draw() {
      var idx = [];
      for (var i = 0; i < spec.rows.length; i++) {
        if (state.verdict && spec.rows[i][vcol] !== state.verdict) continue;
        if (state.text && texts[i].indexOf(state.text) < 0) continue;
        idx.push(i);
      }
      if (state.col >= 0) idx.sort(function (a, b) {
        return state.dir * cmp(spec.rows[a][state.col], spec.rows[b][state.col]);
      });
      var shown = idx.slice(0, limit);
      count.textContent = idx.length + " of " + spec.rows.length + " rows" +
        (shown.length < idx.length ? " (first " + shown.length + " shown; filter to narrow)" : "");
      var head = el("tr", null, spec.columns.map(function (c, j) {
        var mark = j === state.col ? (state.dir > 0 ? " \u25b2" : " \u25bc") : "";
        return el("th", {title: "sort by " + c, onclick: function () {
          state.dir = state.col === j ? -state.dir : 1; state.col = j; draw();
        }}, c + mark);
      }));
      var body = shown.map(function (i) {
        return el("tr", null, spec.rows[i].map(function (v, j) {
          var name = spec.columns[j];
          var cls = name === "reason" ? "reason" : (typeof key(v) === "number" ? "num" : null);
          var attrs = {"class": cls};
          if (name === "verdict") attrs.style = "background:" + colour(v);
          if (j === 0 && Object.prototype.hasOwnProperty.call(byId, v))
            return el("td", null, el("a", {href: "#" + v}, v));
          return el("td", attrs, fmtCI(v));
        }));
      });
      wrap.textContent = "";
      add(wrap, el("table", {"class": "data"}, head, body));
    }
    input.addEventListener("input", function () { state.text = input.value.toLowerCase(); draw(); });
    if (select) select.addEventListener("change", function () { state.verdict = select.value; draw(); });
    draw();
  }

  route(false);
  makeTable(D.heads, "heads-table", 2000);
  var edges = document.getElementById("edges-details");
  if (edges) {
    var done = false;
    edges.addEventListener("toggle", function () {
      if (edges.open && !done) { done = true; makeTable(D.edges, "edges-table", 500); }
    });
  }
  document.documentElement.setAttribute("data-lensattr-ready", "1");
})();

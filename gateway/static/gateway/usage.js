// The usage dashboard's charts: uPlot over the series the page embeds as JSON (no request of its own).
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("usage-data").textContent);
  const colors = { blue: "#417690", red: "#ba2121", green: "#3a8a3a", orange: "#c77c11" };
  const charts = {
    requests: [["requests", data.requests, colors.blue, true], ["errors", data.errors, colors.red, false]],
    tokens: [["tokens in", data.input_tokens, colors.blue, false], ["tokens out", data.output_tokens, colors.green, false]],
    spend: [["credits", data.spend, colors.orange, true]],
    latency: [["p50", data.p50, colors.blue, false], ["p99", data.p99, colors.red, false]],
  };
  // Latency has no value for a quiet hour: a lone busy hour between two quiet ones is a dot, not a line.
  const dotted = { latency: true };
  function draw() {
    document.querySelectorAll("[data-chart]").forEach(function (box) {
      box.textContent = "";
      const lines = charts[box.dataset.chart];
      const width = Math.max(box.clientWidth - 16, 300);
      new uPlot(
        {
          width: width,
          height: 200,
          tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); },
          series: [{}].concat(lines.map(function (line) {
            const series = { label: line[0], stroke: line[2], width: 2, fill: line[3] ? line[2] + "22" : undefined };
            if (dotted[box.dataset.chart]) series.points = { show: true, size: 6, fill: line[2] };
            return series;
          })),
          axes: [{}, { size: 60 }],
        },
        [data.time].concat(lines.map(function (line) { return line[1]; })),
        box
      );
    });
  }
  draw();
  let pending = null;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(draw, 200);
  });
})();

import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Comparator;
import java.util.stream.Stream;
import java.util.List;
import org.opensearch.analysis.common.CommonAnalysisPlugin;
import org.opensearch.common.settings.Settings;
import org.opensearch.http.HttpServerTransport;
import org.opensearch.node.MockNode;
import org.opensearch.transport.Netty4Plugin;

/**
 * One OpenSearch node for the tests (host/tests/common/opensearch.rs), started without the
 * bootstrap (no security manager, jar-hell or bootstrap checks).
 *
 * <p>Usage: {@code TestNode HOME HTTP_PORT [delete-home]}. Data lives in HOME/data; with
 * {@code delete-home}, HOME is removed once the node has stopped (a node shared by a whole
 * test binary, which no test's temporary directory outlives). HTTP_PORT 0 lets the
 * kernel choose (no race for a port); the transport port is always chosen so. Once the node
 * is up it prints {@code http PORT} on stdout. It stops (cleanly) when stdin closes, so a
 * test that dies leaves no node behind.
 */
public class TestNode {
    public static void main(String[] args) throws Exception {
        Path home = Path.of(args[0]);
        Settings s = Settings.builder()
            .put("cluster.name", "trellis-test")
            .put("node.name", "n1")
            .put("path.home", home.toString())
            .put("path.data", home.resolve("data").toString())
            .put("http.type", "netty4")
            .put("transport.type", "netty4")
            .put("network.host", "127.0.0.1")
            .put("http.port", args[1])
            .put("transport.port", "0")
            .put("discovery.type", "single-node")
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            .build();
        MockNode node = new MockNode(s, List.of(Netty4Plugin.class, CommonAnalysisPlugin.class));
        node.start();
        int port = node.injector().getInstance(HttpServerTransport.class)
            .boundAddress().publishAddress().getPort();
        System.out.println("http " + port);
        System.out.flush();
        while (System.in.read() != -1) {
            // Wait for the test to close stdin (or to die).
        }
        node.close();
        if (args.length > 2 && args[2].equals("delete-home")) {
            try (Stream<Path> all = Files.walk(home)) {
                all.sorted(Comparator.reverseOrder()).forEach(p -> {
                    try {
                        Files.delete(p);
                    } catch (IOException e) {
                        throw new UncheckedIOException(e);
                    }
                });
            }
        }
        System.exit(0);
    }
}

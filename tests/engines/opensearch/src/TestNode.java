import java.nio.file.Path;
import java.util.List;
import org.opensearch.common.settings.Settings;
import org.opensearch.node.MockNode;
import org.opensearch.analysis.common.CommonAnalysisPlugin;
import org.opensearch.transport.Netty4Plugin;

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
            .put("transport.port", args[2])
            .put("discovery.type", "single-node")
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            .build();
        MockNode node = new MockNode(s, List.of(Netty4Plugin.class, CommonAnalysisPlugin.class));
        node.start();
        System.out.println("started");
        Thread.currentThread().join();
    }
}
